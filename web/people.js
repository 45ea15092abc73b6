// Who is here: the viewers' avatars from `presence` frames, the name this browser goes by,
// and the sender of each message. Names are other people's text: they only ever reach the
// page as textContent or a title attribute, never as HTML.

const NAME_KEY = "costream.name";
const NAME_MAX_CHARS = 40; // the server cuts longer names (PROTOCOL.md, "presence")
const SHOWN_AVATARS = 8;
const COLOR = /^#[0-9a-f]{6}$/i;

/** The name this browser goes by, or null (kept in localStorage, set once). */
export function storedName() {
  try {
    const name = localStorage.getItem(NAME_KEY);
    return name && name.trim() ? name.trim().slice(0, NAME_MAX_CHARS) : null;
  } catch {
    return null; // storage blocked (private mode, policy): anonymous
  }
}

export function storeName(name) {
  const clean = name.trim().slice(0, NAME_MAX_CHARS);
  try {
    if (clean) localStorage.setItem(NAME_KEY, clean);
    else localStorage.removeItem(NAME_KEY);
  } catch {
    // not remembered; still used for this page
  }
  return clean || null;
}

// The server's colours (server/costream/server/session.py, PERSON_COLORS) and its choice:
// CRC-32 of the lower-cased name. A message carries its sender's name, not a colour, so the
// page picks the same one the server gives that name in presence.
const PERSON_COLORS = [
  "#b42318",
  "#b54708",
  "#067647",
  "#0e7090",
  "#175cd3",
  "#5925dc",
  "#9f1ab1",
  "#c01048",
];

function crc32(bytes) {
  let crc = ~0;
  for (const byte of bytes) {
    crc ^= byte;
    for (let bit = 0; bit < 8; bit += 1) crc = (crc >>> 1) ^ (0xedb88320 & -(crc & 1));
  }
  return ~crc >>> 0;
}

/** The colour the server gives this name. */
export function colorOf(name) {
  return PERSON_COLORS[crc32(new TextEncoder().encode(name.toLowerCase())) % PERSON_COLORS.length];
}

/** "Ada Lovelace" -> "AL", "ada" -> "A", no name -> "?". */
export function initials(name) {
  if (!name) return "?";
  const words = name.trim().split(/\s+/u).filter(Boolean);
  const letters = words.slice(0, 2).map((word) => Array.from(word)[0] ?? "");
  return letters.join("").toUpperCase() || "?";
}

/** A coloured circle with a person's initials; the full name in its title. */
export function avatar(person, { you = false } = {}) {
  const span = document.createElement("span");
  span.className = "avatar";
  span.dataset.testid = "avatar";
  span.textContent = initials(person.name);
  const who = person.name ?? `Unnamed ${person.role ?? "viewer"}`;
  span.title = `${who}${person.role === "writer" ? " (can write)" : ""}${you ? " (you)" : ""}`;
  span.setAttribute("aria-label", span.title);
  if (typeof person.color === "string" && COLOR.test(person.color)) {
    span.style.backgroundColor = person.color; // CSSOM, allowed by the page's CSP
  }
  if (you) span.classList.add("you");
  return span;
}

/** Draw the first avatars of `people` (the server's list, in join order) into `container`. */
export function showPeople(container, people, viewers, viewerId) {
  const list = Array.isArray(people) ? people : [];
  const shown = list.slice(0, SHOWN_AVATARS).map((person) =>
    avatar(person, { you: person.id === viewerId }),
  );
  const more = Math.max(0, (Number(viewers) || 0) - shown.length);
  if (more > 0) {
    const rest = document.createElement("span");
    rest.className = "avatar more";
    rest.textContent = `+${more}`;
    rest.title = `${more} more watching`;
    shown.push(rest);
  }
  container.replaceChildren(...shown);
  container.hidden = shown.length === 0;
  const names = list.filter((p) => p.name).map((p) => p.name);
  container.title = names.length ? `Watching: ${names.join(", ")}` : "";
}

/** The "Your name" control: a dialog that sets the name once; `onName` gets the new one. */
export function bindNameDialog(root, onName) {
  const button = root.querySelector('[data-testid="name-button"]');
  const dialog = root.querySelector('[data-testid="name-dialog"]');
  const form = root.querySelector('[data-testid="name-form"]');
  const input = root.querySelector('[data-testid="name-input"]');
  const label = () => {
    const name = storedName();
    button.textContent = name ? name : "Set your name";
    button.title = name ? "The name others see: change it" : "Let others see who you are";
  };
  label();
  button.hidden = false;
  button.addEventListener("click", () => {
    input.value = storedName() ?? "";
    dialog.showModal();
    input.focus();
  });
  root.querySelector('[data-testid="name-cancel"]').addEventListener("click", () => dialog.close());
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = storeName(input.value);
    dialog.close();
    label();
    onName(name);
  });
}
