// "Your conversations": the conversations this browser created or opened, with their
// links, kept in localStorage (never sent anywhere). The links carry tokens, so they stay
// on this device; "Forget" removes one.

const KEY = "costream.conversations";
const MAX_SAVED = 50;

/** The saved conversations, most recently seen first. */
export function savedConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) ?? "[]");
    return Array.isArray(list) ? list.filter((item) => item && typeof item.id === "string") : [];
  } catch {
    return []; // storage off (private mode) or damaged: nothing saved
  }
}

function store(list) {
  try {
    localStorage.setItem(KEY, JSON.stringify(list.slice(0, MAX_SAVED)));
  } catch {
    // storage full or off: the list is a convenience
  }
}

/** Remember (or update) a conversation: `{id, title?, viewUrl?, writeUrl?}`. */
export function saveConversation(entry) {
  const list = savedConversations();
  const old = list.find((item) => item.id === entry.id) ?? {};
  const merged = { ...old, lastSeen: Date.now() };
  for (const [name, value] of Object.entries(entry)) if (value) merged[name] = value;
  store([merged, ...list.filter((item) => item.id !== entry.id)]);
}

export function forgetConversation(id) {
  store(savedConversations().filter((item) => item.id !== id));
}
