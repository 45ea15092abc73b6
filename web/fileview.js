// A tool call that writes a file, shown as the file: its path, its size and its content
// (Markdown rendered, anything else as a code block), while the arguments still stream.
// The arguments are JSON arriving in pieces, so they are read with a tolerant scanner
// that takes the string fields it has so far, the last one possibly cut short.

import { renderMarkdownInto } from "./markdown.js";

const MARKDOWN = /\.(md|markdown|mdown)$/i;
const LANGUAGES = {
  py: "python",
  js: "javascript",
  mjs: "javascript",
  ts: "typescript",
  json: "json",
  sh: "bash",
  bash: "bash",
  html: "xml",
  xml: "xml",
  css: "css",
  yml: "yaml",
  yaml: "yaml",
  toml: "ini",
  ini: "ini",
  rs: "rust",
  go: "go",
  java: "java",
  c: "c",
  h: "c",
  cpp: "cpp",
  sql: "sql",
  rb: "ruby",
  txt: "plaintext",
};

/**
 * The top-level string fields of a JSON object that may be cut anywhere: `{fields,
 * complete}`, where `complete` is false when the text ended inside the last field.
 */
export function readStringFields(text) {
  const fields = {};
  let i = text.indexOf("{");
  if (i < 0) return { fields, complete: false };
  i++;
  const skipSpace = () => {
    while (i < text.length && " \t\r\n,".includes(text[i])) i++;
  };
  while (i < text.length) {
    skipSpace();
    if (text[i] === "}") return { fields, complete: true };
    if (text[i] !== '"') return { fields, complete: false };
    const key = readString();
    if (key.cut) return { fields, complete: false };
    skipSpace();
    if (text[i] !== ":") return { fields, complete: false };
    i++;
    skipSpace();
    if (text[i] === '"') {
      const value = readString();
      fields[key.value] = value.value;
      if (value.cut) return { fields, complete: false };
    } else if (!skipValue()) {
      return { fields, complete: false };
    }
  }
  return { fields, complete: false };

  function readString() {
    let value = "";
    i++; // the opening quote
    while (i < text.length) {
      const c = text[i];
      if (c === '"') {
        i++;
        return { value, cut: false };
      }
      if (c !== "\\") {
        const end = nextSpecial(i);
        value += text.slice(i, end);
        i = end;
        continue;
      }
      const e = text[i + 1];
      if (e === undefined) break;
      if (e === "u") {
        const hex = text.slice(i + 2, i + 6);
        if (hex.length < 4) break;
        value += String.fromCharCode(parseInt(hex, 16));
        i += 6;
      } else {
        value += { n: "\n", t: "\t", r: "\r", b: "\b", f: "\f" }[e] ?? e;
        i += 2;
      }
    }
    i = text.length;
    return { value, cut: true };
  }

  function nextSpecial(from) {
    let j = from;
    while (j < text.length && text[j] !== '"' && text[j] !== "\\") j++;
    return j;
  }

  function skipValue() {
    let depth = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === '"') {
        if (readString().cut) return false;
        continue;
      }
      if (c === "{" || c === "[") depth++;
      else if (c === "}" || c === "]") {
        if (depth === 0) return true;
        depth--;
      } else if (c === "," && depth === 0) return true;
      i++;
    }
    return false;
  }
}

/** `{path, content, complete}` when a tool call writes a whole file, else null. */
export function fileWrite(name, argsText) {
  const { fields, complete } = readStringFields(argsText);
  if (name === "write_file" && "content" in fields)
    return { path: fields.path ?? "", content: fields.content, complete };
  // OpenHands' file editor: {"command": "create", "path": ..., "file_text": ...}
  if (fields.command === "create" && "file_text" in fields)
    return { path: fields.path ?? "", content: fields.file_text, complete };
  return null;
}

function longestBacktickRun(text) {
  let longest = 0;
  for (const run of text.match(/`+/g) ?? []) longest = Math.max(longest, run.length);
  return longest;
}

/** The Markdown that shows a file: itself for Markdown files, else one fenced code block. */
export function fileMarkdown(path, content) {
  if (MARKDOWN.test(path)) return content;
  const extension = (path.match(/\.([A-Za-z0-9]+)$/) ?? [])[1]?.toLowerCase() ?? "";
  const language = LANGUAGES[extension] ?? "plaintext";
  const fence = "`".repeat(Math.max(3, longestBacktickRun(content) + 1));
  return `${fence}${language}\n${content}\n${fence}`;
}

export function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} kB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

const encoder = new TextEncoder();

/** Draw `file` into a file view ({path, size, body, markdown state}). */
export function drawFile(view, file, streaming) {
  view.path.textContent = file.path || "(no path yet)";
  view.size.textContent = streaming
    ? "writing…"
    : formatSize(encoder.encode(file.content).length);
  view.body.classList.toggle("markdown-file", MARKDOWN.test(file.path));
  renderMarkdownInto(view.body, fileMarkdown(file.path, file.content), view.markdown, !streaming);
}
