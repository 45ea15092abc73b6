// Model output is untrusted: it becomes Markdown through marked, then DOMPurify with a
// short allow-list. Raw HTML in the Markdown is shown as text, never parsed; links may
// only go to http(s) or mailto and open in a new tab without an opener; no images (they
// would fetch from any host the model names, telling it who watches). Code blocks get
// syntax colours (highlight.js, which only ever writes escaped text into spans) once they
// are complete, and a copy button.

import { Marked } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.mjs";
import hljs from "./vendor/highlight/highlight.min.js";

// A code block longer than this is shown plain: colouring it would stall the page.
const MAX_HIGHLIGHT_CHARS = 100_000;

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
  ALLOWED_ATTR: ["href", "title", "align", "start", "type", "checked", "disabled", "class"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

// The one class kept: a code block's language (`language-python`), for the highlighter.
const LANGUAGE_CLASS = /^language-[\w+#.-]{1,40}$/;

DOMPurify.addHook("afterSanitizeAttributes", (element) => {
  if (element.hasAttribute("class")) {
    const keep = element.tagName === "CODE" && LANGUAGE_CLASS.test(element.getAttribute("class"));
    if (!keep) element.removeAttribute("class");
  }
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

/** Colour a complete code block and give it a copy button (once per block). */
function finishCodeBlocks(block) {
  if (block.dataset.finished) return;
  block.dataset.finished = "true";
  for (const code of block.querySelectorAll("pre > code")) {
    const pre = code.parentElement;
    const language = (code.className.match(/^language-(.+)$/) ?? [])[1];
    if (code.textContent.length <= MAX_HIGHLIGHT_CHARS && (!language || hljs.getLanguage(language)))
      hljs.highlightElement(code);
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-code";
    copy.dataset.testid = "copy-code";
    copy.setAttribute("aria-label", "Copy code");
    copy.addEventListener("click", () => copyToClipboard(code.textContent, copy));
    const frame = document.createElement("div");
    frame.className = "code-block";
    pre.replaceWith(frame);
    frame.append(copy, pre);
  }
}

/** Copy `text`; the button says so for a moment (its label is CSS, not page text). */
export async function copyToClipboard(text, button) {
  let done = true;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    done = false; // no clipboard permission (plain http, old browser)
  }
  button.dataset.copied = done ? "true" : "failed";
  setTimeout(() => delete button.dataset.copied, 1500);
  return done;
}

/**
 * Render `text` into `container`, re-rendering only the blocks that changed since the last
 * call with the same `state` (a streaming segment only ever changes at its end). Blocks
 * before the last, and the last once `complete`, get their code blocks finished.
 */
export function renderMarkdownInto(container, text, state, complete = true) {
  const tokens = markdown.lexer(text);
  const raws = state.raws ?? [];
  let same = 0;
  while (same < tokens.length && same < raws.length && tokens[same].raw === raws[same]) same++;
  // A block that was last may have been cut short (e.g. the first half of a list); a
  // reference link defined later changes earlier blocks too: keep it simple and exact.
  if (same === tokens.length && same === raws.length && state.links === linkKey(tokens)) {
    if (complete && container.lastElementChild) finishCodeBlocks(container.lastElementChild);
    return;
  }
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
  const finished = complete ? blocks.length : blocks.length - 1;
  for (let i = 0; i < finished; i++) finishCodeBlocks(blocks[i]);
}

function linkKey(tokens) {
  const links = tokens.links;
  return links ? Object.keys(links).length : 0;
}
