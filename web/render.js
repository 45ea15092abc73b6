// Draws a ConversationModel into the log element. Only what the model marked dirty is
// touched; each view remembers the version it drew, and streaming text is appended, not
// re-set. Model text is only ever set through textContent or the Markdown sanitizer.

import { drawFile, fileWrite } from "./fileview.js";
import { renderMarkdownInto } from "./markdown.js";
import { avatar, colorOf } from "./people.js";

const LONG_RESULT_CHARS = 600;
const LONG_RESULT_LINES = 12;

const TOOL_STATUS = {
  args: "streaming arguments",
  running: "running",
  done: "done",
  error: "error",
  skipped: "not run",
};

function el(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else element.setAttribute(name, value);
  }
  element.append(...children);
  return element;
}

export function formatCost(usd) {
  if (usd == null) return null;
  if (usd === 0) return "$0.00";
  if (usd < 0.0001) return "<$0.0001";
  return `$${usd < 1 ? usd.toFixed(4) : usd.toFixed(2)}`;
}

/** RUN_FINISHED `usage`: one object, or one per model used (summed here). */
export function formatUsage(usage) {
  if (!usage) return null;
  const parts = Array.isArray(usage) ? usage : [usage];
  if (parts.length === 0) return null;
  const sum = (name) => parts.reduce((total, part) => total + (Number(part?.[name]) || 0), 0);
  const input = sum("inputTokens");
  const output = sum("outputTokens");
  const reasoning = sum("reasoningTokens");
  const total = sum("totalTokens") || input + output;
  const n = (v) => v.toLocaleString("en-US");
  let text = `${n(total)} tokens (${n(input)} in, ${n(output)} out`;
  if (reasoning) text += `, ${n(reasoning)} reasoning`;
  return `${text})`;
}

/** A publisher's CUSTOM stream_gap, in words: what of this run's stream is missing. */
export function describeGap(gap) {
  const n = (v) => v.toLocaleString("en-US");
  let text = gap.resumes
    ? "The producer lost its server; this run continues the interrupted one"
    : "Part of this run's stream was lost";
  if (gap.lost) text += `: ${n(gap.lost)} ${gap.lost === 1 ? "event" : "events"} missing`;
  if (gap.unconfirmed) text += `${gap.lost ? "," : ":"} ${n(gap.unconfirmed)} more may be`;
  return `${text}.`;
}

function thoughtLabel(segment) {
  if (segment.open) return "Thinking…";
  if (segment.startedAt == null || segment.endedAt == null) return "Thoughts";
  const seconds = Math.max(1, Math.round((segment.endedAt - segment.startedAt) / 1000));
  return `Thought for ${seconds} s`;
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text; // not JSON after all: show it as it came
  }
}

export class Renderer {
  constructor(root, model) {
    this.root = root;
    this.model = model;
    this.views = new Map(); // model node key -> view
    this.live = false; // true once caught up: streaming segments get a caret
  }

  /** Forget all views (the model was reset). */
  clear() {
    this.views.clear();
    this.root.replaceChildren();
  }

  /** Draw what changed since the last call. */
  render() {
    const model = this.model;
    if (model.structureChanged) {
      reconcile(
        this.root,
        model.runs.map((run) => this.ensure(run).el),
      );
      model.structureChanged = false;
    }
    for (const item of model.dirty) {
      const view = this.views.get(item.key);
      if (view === undefined) this.ensure(item);
      else if (view.version !== item.version) this.update(item, view);
    }
    model.dirty.clear();
  }

  ensure(item) {
    let view = this.views.get(item.key);
    if (view === undefined) {
      view = this.create(item);
      this.views.set(item.key, view);
      this.update(item, view);
    }
    return view;
  }

  create(item) {
    switch (item.kind) {
      case "run": {
        const user = el("div", { class: "user-message", "data-testid": "user-message" });
        const senderName = el("span", { class: "user-name", "data-testid": "user-name" });
        const sender = el("div", { class: "user-sender" }, senderName);
        sender.hidden = true;
        const steps = el("div", { class: "steps" });
        const error = el("div", { class: "run-error", role: "alert", "data-testid": "run-error" });
        const footer = el("footer", { class: "run-footer", "data-testid": "run-footer" });
        const gap = el("div", { class: "run-gap", role: "note", "data-testid": "stream-gap" });
        gap.hidden = true;
        error.hidden = true;
        footer.hidden = true;
        const article = el(
          "article",
          { class: "run", "data-testid": "run" },
          sender,
          user,
          gap,
          steps,
          error,
          footer,
        );
        return { el: article, user, sender, senderName, gap, steps, error, footer, version: 0 };
      }
      case "step": {
        const note = el("div", { class: "step-note", "data-testid": "step-retry" });
        note.hidden = true;
        const segments = el("div", { class: "segments" });
        const section = el("section", { class: "step", "data-testid": "step" }, note, segments);
        return { el: section, note, segments, version: 0 };
      }
      case "reasoning": {
        const summary = el("summary", { "data-testid": "thinking-summary" });
        const body = el("div", { class: "thinking-text", "data-testid": "thinking-text" });
        const details = el(
          "details",
          { class: "thinking", "data-testid": "thinking" },
          summary,
          body,
        );
        details.open = true;
        const view = {
          el: details,
          summary,
          body,
          text: document.createTextNode(""),
          length: 0,
          userToggled: false,
          version: 0,
        };
        body.append(view.text);
        // A click or Enter/Space on the summary is the person's choice: never override it.
        summary.addEventListener("click", () => {
          view.userToggled = true;
        });
        return view;
      }
      case "text": {
        const body = el("div", { class: "content markdown", "data-testid": "content" });
        return { el: body, markdown: {}, version: 0 };
      }
      case "tool": {
        const name = el("span", { class: "tool-name", "data-testid": "tool-name" });
        const status = el("span", { class: "tool-status", "data-testid": "tool-status" });
        const args = el("pre", { class: "tool-args", "data-testid": "tool-args" });
        const argsText = document.createTextNode("");
        args.append(argsText);
        const result = el("div", { class: "tool-result", "data-testid": "tool-result" });
        result.hidden = true;
        // A file being written: shown as the file, the arguments' JSON one click away.
        const filePath = el("span", { class: "file-path", "data-testid": "file-card-path" });
        const fileSize = el("span", { class: "file-size muted", "data-testid": "file-card-size" });
        const fileBody = el("div", { class: "file-body markdown", "data-testid": "file-card-body" });
        const toggle = el("button", {
          type: "button",
          class: "tool-toggle",
          "data-testid": "tool-view-toggle",
          text: "JSON",
        });
        const file = el(
          "div",
          { class: "file-card", "data-testid": "file-card" },
          el("div", { class: "file-card-head" }, filePath, fileSize),
          fileBody,
        );
        file.hidden = true;
        toggle.hidden = true;
        const card = el(
          "div",
          { class: "tool-card", "data-testid": "tool-card" },
          el(
            "div",
            { class: "tool-head" },
            el("span", { class: "tool-icon", "aria-hidden": "true", text: "⚙" }),
            name,
            status,
            toggle,
          ),
          file,
          args,
          result,
        );
        const view = {
          el: card,
          name,
          status,
          args,
          argsText,
          length: 0,
          pretty: false,
          result,
          resultShown: null,
          file: { el: file, path: filePath, size: fileSize, body: fileBody, markdown: {} },
          toggle,
          showJson: false,
          version: 0,
        };
        toggle.addEventListener("click", () => {
          view.showJson = !view.showJson;
          showFileOrJson(view);
        });
        return view;
      }
      default:
        throw new Error(`no view for ${item.kind}`);
    }
  }

  update(item, view) {
    view.version = item.version;
    switch (item.kind) {
      case "run":
        return this.updateRun(item, view);
      case "step":
        return this.updateStep(item, view);
      case "reasoning":
        return this.updateReasoning(item, view);
      case "text":
        return this.updateText(item, view);
      case "tool":
        return this.updateTool(item, view);
    }
  }

  updateRun(run, view) {
    view.el.dataset.status = run.status;
    if (run.userText != null && view.user.textContent !== run.userText) {
      view.user.textContent = run.userText;
    }
    view.user.hidden = run.userText == null;
    if (view.senderName.textContent !== (run.userName ?? "")) {
      view.senderName.textContent = run.userName ?? "";
      view.sender.replaceChildren(
        ...(run.userName ? [avatar({ name: run.userName, color: colorOf(run.userName) })] : []),
        view.senderName,
      );
    }
    view.sender.hidden = run.userName == null || run.userText == null;
    reconcile(
      view.steps,
      run.steps.map((step) => this.ensure(step).el),
    );
    view.gap.hidden = run.gap === null;
    if (run.gap) view.gap.textContent = describeGap(run.gap);
    view.error.hidden = run.error === null;
    if (run.error) {
      view.error.replaceChildren(
        el("strong", { text: "The run failed: " }),
        el("span", { "data-testid": "run-error-message", text: run.error.message }),
        ...(run.error.code ? [el("span", { class: "code", text: ` (${run.error.code})` })] : []),
      );
    }
    const parts = [];
    if (run.status === "cancelled")
      parts.push(
        el("span", { class: "run-cancelled", "data-testid": "run-cancelled", text: "Stopped" }),
      );
    const usage = formatUsage(run.usage);
    if (usage) parts.push(el("span", { "data-testid": "run-tokens", text: usage }));
    const cost = formatCost(run.costUsd);
    if (cost) parts.push(el("span", { "data-testid": "run-cost", text: `${cost} this run` }));
    const total = formatCost(run.totalCostUsd);
    if (total)
      parts.push(el("span", { "data-testid": "run-total-cost", text: `${total} in total` }));
    view.footer.replaceChildren(...parts);
    view.footer.hidden = parts.length === 0;
  }

  updateStep(step, view) {
    view.el.classList.toggle("abandoned", step.abandoned);
    view.el.dataset.abandoned = String(step.abandoned);
    view.note.hidden = !(step.abandoned || step.attempt > 1);
    if (step.abandoned) {
      const reason = step.retryReason ? `: ${step.retryReason}` : "";
      view.note.textContent = `Attempt ${step.attempt} abandoned, retried${reason}`;
    } else if (step.attempt > 1) {
      view.note.textContent = `Retry, attempt ${step.attempt}`;
    }
    reconcile(
      view.segments,
      step.segments.map((segment) => this.ensure(segment).el),
    );
  }

  updateReasoning(segment, view) {
    appendText(view, segment.text);
    view.summary.textContent = thoughtLabel(segment);
    view.body.classList.toggle("streaming", segment.open && this.live);
    view.el.dataset.state = segment.open ? "streaming" : "done";
    if (!view.userToggled) view.el.open = segment.open;
  }

  updateText(segment, view) {
    renderMarkdownInto(view.el, segment.text, view.markdown, !segment.open);
    view.el.classList.toggle("streaming", segment.open && this.live);
  }

  updateTool(segment, view) {
    view.el.dataset.status = segment.status;
    view.name.textContent = segment.name ?? "tool";
    view.status.textContent = TOOL_STATUS[segment.status] ?? segment.status;
    if (segment.open) {
      if (segment.text.length < view.length) {
        view.argsText.data = "";
        view.length = 0;
      }
      view.argsText.appendData(segment.text.slice(view.length));
      view.length = segment.text.length;
    } else if (!view.pretty) {
      view.argsText.data = prettyJson(segment.text);
      view.pretty = true;
    }
    const file = fileWrite(segment.name, segment.text);
    view.toggle.hidden = file === null;
    if (file !== null) {
      drawFile(view.file, file, segment.open);
      showFileOrJson(view);
    }
    if (segment.result !== null && view.resultShown !== segment.result) {
      view.resultShown = segment.result;
      view.result.replaceChildren(resultView(segment.result, segment.isError));
      view.result.hidden = false;
    }
  }
}

function showFileOrJson(view) {
  view.file.el.hidden = view.showJson;
  view.args.hidden = !view.showJson;
  view.toggle.textContent = view.showJson ? "File" : "JSON";
  view.toggle.setAttribute("aria-pressed", String(view.showJson));
}

function appendText(view, text) {
  if (text.length < view.length) {
    view.text.data = "";
    view.length = 0;
  }
  if (text.length > view.length) {
    view.text.appendData(text.slice(view.length));
    view.length = text.length;
  }
}

function resultView(text, isError) {
  const pre = el("pre", { class: "tool-result-text", "data-testid": "tool-result-text", text });
  const lines = text.split("\n").length;
  const label = isError ? "Error" : "Result";
  if (text.length <= LONG_RESULT_CHARS && lines <= LONG_RESULT_LINES) {
    return el(
      "div",
      { class: isError ? "result error" : "result" },
      el("div", { class: "result-label", text: label }),
      pre,
    );
  }
  const summary = el("summary", {
    text: `${label} (${lines.toLocaleString("en-US")} lines, ${text.length.toLocaleString("en-US")} characters)`,
  });
  return el("details", { class: isError ? "result error" : "result" }, summary, pre);
}

/** Make `container`'s children exactly `elements`, in order, moving as little as possible. */
function reconcile(container, elements) {
  let index = 0;
  for (const element of elements) {
    const current = container.children[index];
    if (current !== element) container.insertBefore(element, current ?? null);
    index++;
  }
  while (container.children.length > elements.length) container.lastElementChild.remove();
}
