// Model output is untrusted: it becomes Markdown through marked, then DOMPurify with a
// short allow-list. Raw HTML in the Markdown is shown as text, never parsed; links may
// only go to http(s) or mailto and open in a new tab without an opener; no images (they
// would fetch from any host the model names, telling it who watches).

import { Marked } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.mjs";

export function escapeHtml(text) {
  return text.replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c],
  );
}

const markdown = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    html({ text }) {
      return escapeHtml(text);
    },
    image({ text }) {
      return escapeHtml(text ?? "");
    },
  },
});

const PURIFY = {
  ALLOWED_TAGS: [
    "p",
    "br",
    "hr",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "strong",
    "em",
    "del",
    "s",
    "code",
    "pre",
    "blockquote",
    "ul",
    "ol",
    "li",
    "a",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "sup",
    "sub",
    "kbd",
    "span",
    "input",
  ],
  ALLOWED_ATTR: ["href", "title", "align", "start", "type", "checked", "disabled"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (element) => {
  if (element.tagName === "A") {
    if (element.hasAttribute("href")) {
      element.setAttribute("target", "_blank");
      element.setAttribute("rel", "noopener noreferrer nofollow");
    }
  } else if (element.tagName === "INPUT") {
    // Only GFM task-list checkboxes, and never interactive.
    if (element.getAttribute("type") !== "checkbox") element.remove();
    else element.setAttribute("disabled", "");
  }
});

/**
 * Render `text` into `container`, re-rendering only the blocks that changed since the last
 * call with the same `state` (a streaming segment only ever changes at its end).
 */
export function renderMarkdownInto(container, text, state) {
  const tokens = markdown.lexer(text);
  const raws = state.raws ?? [];
  let same = 0;
  while (same < tokens.length && same < raws.length && tokens[same].raw === raws[same]) same++;
  // A block that was last may have been cut short (e.g. the first half of a list); a
  // reference link defined later changes earlier blocks too: keep it simple and exact.
  if (same === tokens.length && same === raws.length && state.links === linkKey(tokens)) return;
  if (state.links !== linkKey(tokens)) same = 0;
  const blocks = container.children;
  while (blocks.length > same) container.lastElementChild.remove();
  for (let i = same; i < tokens.length; i++) {
    const block = document.createElement("div");
    block.className = "md-block";
    const list = [tokens[i]];
    list.links = tokens.links;
    block.append(DOMPurify.sanitize(markdown.parser(list), PURIFY));
    container.append(block);
  }
  state.raws = tokens.map((t) => t.raw);
  state.links = linkKey(tokens);
}

function linkKey(tokens) {
  const links = tokens.links;
  return links ? Object.keys(links).length : 0;
}
