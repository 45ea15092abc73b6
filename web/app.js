// The page: the start page at `/`, the conversation page at `/c/{id}#t={token}`.
// Events go into the model as they arrive; the DOM is drawn at most once per animation
// frame (once at the end of a replay), from what the model marked dirty.

import { CostreamClient } from "./client.js";
import { formatSize } from "./fileview.js";
import { ConversationModel } from "./model.js";
import { bindNameDialog, showPeople, storedName } from "./people.js";
import { formatCost, Renderer } from "./render.js";
import { forgetConversation, savedConversations, saveConversation } from "./saved.js";

const DEMO_MODEL = "costream/demo";
const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);

function modelLabel(model, { short = false } = {}) {
  if (model !== DEMO_MODEL) return model;
  return short ? `${model} (demo model)` : `${model} (the built-in demo model: no LLM, no API key)`;
}

async function copyText(input, button) {
  try {
    await navigator.clipboard.writeText(input.value);
  } catch {
    input.select(); // no clipboard permission (plain http, old browser): the old way
    document.execCommand("copy");
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => {
    button.textContent = label;
  }, 1500);
}

// ---- start page ------------------------------------------------------------------------

function startPage() {
  $("home").hidden = false;
  const form = $("create-form");
  const error = $("create-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    const button = $("create-button");
    button.disabled = true;
    try {
      const title = $("create-title").value.trim();
      const answer = await fetch("/api/conversations", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(title ? { title } : {}),
      });
      const body = await answer.json().catch(() => ({}));
      if (!answer.ok) throw new Error(body.error?.message ?? `HTTP ${answer.status}`);
      saveConversation({
        id: body.id,
        title: title || "Untitled conversation",
        viewUrl: body.viewUrl,
        writeUrl: body.writeUrl,
      });
      showSaved();
      $("view-link").value = body.viewUrl;
      $("write-link").value = body.writeUrl;
      $("created-model").textContent = modelLabel(body.model ?? "");
      $("open-conversation").href = body.writeUrl;
      $("created").hidden = false;
      $("open-conversation").focus();
    } catch (failure) {
      error.textContent = `Could not start a conversation: ${failure.message}`;
      error.hidden = false;
    } finally {
      button.disabled = false;
    }
  });
  bindCopyButtons();
  showSaved();
}

function bindCopyButtons() {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", () =>
      copyText(document.getElementById(button.dataset.copy), button),
    );
  }
}

/** The start page's "Your conversations", from this browser's storage. */
function showSaved() {
  const saved = savedConversations();
  $("saved").hidden = saved.length === 0;
  $("saved-list").replaceChildren(
    ...saved.map((item) => {
      const link = document.createElement("a");
      link.href = item.writeUrl ?? item.viewUrl ?? `/c/${encodeURIComponent(item.id)}`;
      link.textContent = item.title || "Untitled conversation";
      link.dataset.testid = "saved-link";
      const role = document.createElement("span");
      role.className = "badge";
      role.textContent = item.writeUrl ? "can write" : "view only";
      const forget = document.createElement("button");
      forget.type = "button";
      forget.className = "forget";
      forget.textContent = "Forget";
      forget.dataset.testid = "saved-forget";
      forget.addEventListener("click", () => {
        forgetConversation(item.id);
        showSaved();
      });
      const row = document.createElement("li");
      row.dataset.testid = "saved-item";
      row.append(link, role, forget);
      return row;
    }),
  );
}

// ---- conversation page -----------------------------------------------------------------

class ConversationPage {
  constructor(conversationId, token) {
    this.conversationId = conversationId;
    this.token = token;
    this.model = new ConversationModel();
    this.log = $("log");
    this.scroller = $("log-scroll");
    this.renderer = new Renderer(this.log, this.model);
    this.caughtUp = false;
    this.renderScheduled = null;
    this.renders = 0;
    this.role = null;
    this.pending = false; // a message was sent and not yet accepted or refused
    this.stick = true; // follow the stream while the reader is at the bottom
    this.lastScrollTop = 0;
    this.filesSeen = -1;
    this.filesTimer = null;
    this.client = new CostreamClient({
      conversationId,
      token,
      onEvent: (event) => this.onEvent(event),
      onReset: () => this.onReset(),
      onWelcome: (welcome) => this.onWelcome(welcome),
      onControl: (frame) => this.onControl(frame),
      onState: (state, reason) => this.onState(state, reason),
      onCaughtUp: () => this.catchUp(),
      name: storedName(),
    });
  }

  start() {
    $("conversation").hidden = false;
    this.bindShare();
    bindNameDialog(document, (name) => this.client.setName(name));
    this.bindComposer();
    this.bindScroll();
    this.bindFiles();
    if (matchMedia("(max-width: 760px)").matches)
      document.getElementById("files-details").open = false;
    addEventListener("online", () => this.onState(this.client.state, this.client.stopReason));
    addEventListener("offline", () => this.onState(this.client.state, this.client.stopReason));
    this.client.connect();
    this.loadInfo();
  }

  api(path, init = {}) {
    const base = `/api/conversations/${encodeURIComponent(this.conversationId)}`;
    return fetch(base + path, {
      ...init,
      headers: { Authorization: `Bearer ${this.token}`, ...(init.headers ?? {}) },
    });
  }

  async loadInfo() {
    try {
      const answer = await this.api("");
      if (!answer.ok) return;
      const info = await answer.json();
      this.title = info.title;
      this.remember();
      $("title").textContent = info.title;
      document.title = `${info.title} · costream`;
      if (this.model.totalCostUsd == null && info.totalCostUsd != null) {
        this.model.totalCostUsd = info.totalCostUsd;
        this.showTotal();
      }
    } catch {
      // the title is a nicety; the WebSocket says what matters
    }
  }

  // --- protocol ---

  onWelcome(welcome) {
    this.welcomedAt ??= performance.now();
    this.role = welcome.role;
    this.remember();
    this.conversationModel = welcome.model;
    this.showModel(this.stepModel ?? welcome.model);
    $("share").hidden = false;
    this.viewerId = welcome.viewerId ?? null;
    this.showPresence(welcome.viewers, welcome.people);
    const viewer = welcome.role !== "writer";
    $("role").hidden = !viewer;
    $("view-only").hidden = !viewer;
    $("composer").hidden = viewer;
    this.pending = false;
    this.pendingRunId = null;
    this.updateComposer();
  }

  /** The model badge: the model of the latest step (any producer), else the conversation's. */
  showModel(name) {
    const model = $("model");
    model.textContent = modelLabel(name, { short: true });
    model.title = name === DEMO_MODEL ? modelLabel(name) : "The model answering";
    model.classList.toggle("demo", name === DEMO_MODEL);
    model.hidden = !name;
  }

  /** Keep this conversation in the browser's list, with the link that opened it. */
  remember() {
    if (this.role === null) return;
    const link = `${location.origin}/c/${encodeURIComponent(this.conversationId)}#t=${this.token}`;
    saveConversation({
      id: this.conversationId,
      title: this.title,
      [this.role === "writer" ? "writeUrl" : "viewUrl"]: link,
    });
  }

  bindShare() {
    const dialog = $("share-dialog");
    $("share").addEventListener("click", () => this.openShare());
    $("share-close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close();
    });
    bindCopyButtons();
  }

  async openShare() {
    const dialog = $("share-dialog");
    const own = `${location.origin}/c/${encodeURIComponent(this.conversationId)}#t=${this.token}`;
    const writer = this.role === "writer";
    let viewUrl = writer ? (savedConversations().find((c) => c.id === this.conversationId)?.viewUrl ?? null) : own;
    if (writer && viewUrl === null) {
      try {
        const answer = await this.api("/links");
        if (answer.ok) viewUrl = (await answer.json()).viewUrl ?? null;
      } catch {
        // offline: the write link is still there to copy
      }
      if (viewUrl) saveConversation({ id: this.conversationId, viewUrl });
    }
    $("share-view-link").value = viewUrl ?? "";
    $("share-view-link").closest(".share-row").hidden = viewUrl === null;
    $("share-view-missing").hidden = viewUrl !== null;
    $("share-write").hidden = !writer;
    $("share-write-link").value = writer ? own : "";
    if (!dialog.open) dialog.showModal();
  }

  onReset() {
    this.model.reset();
    this.renderer.clear();
    this.caughtUp = false;
    this.renderer.live = false;
  }

  onEvent(event) {
    this.model.apply(event);
    const stepModel = event.type === "STEP_STARTED" ? event.metadata?.model : undefined;
    if (stepModel && stepModel !== this.stepModel) {
      this.stepModel = stepModel;
      if (this.role !== null) this.showModel(stepModel);
    }
    if (this.caughtUp && this.model.workspaceChanges !== this.filesSeen) this.refreshFilesSoon();
    this.scheduleRender();
  }

  /** The replay is done: draw it all at once, then follow live. */
  catchUp() {
    if (this.caughtUp) return;
    this.caughtUp = true;
    this.renderer.live = true;
    this.renderNow();
    this.scrollToBottom();
    this.refreshFilesSoon(0);
    this.caughtUpAt = performance.now();
    document.body.dataset.caughtUp = "true";
  }

  onControl(frame) {
    switch (frame.type) {
      case "presence":
        this.showPresence(frame.viewers, frame.people);
        break;
      case "accepted":
        // The reply can overtake RUN_STARTED: stay busy until the run is on the page.
        this.pendingRunId = frame.runId;
        this.updateComposer();
        break;
      case "error":
        this.lastError = frame;
        this.pending = false;
        this.pendingRunId = null;
        this.showComposerError(frame.message || frame.code);
        this.updateComposer();
        break;
    }
  }

  onState(state, reason) {
    const badge = $("connection");
    let shown = state;
    if (state === "reconnecting" && !navigator.onLine) shown = "offline";
    const labels = {
      idle: "connecting…",
      connecting: "connecting…",
      live: "live",
      reconnecting: "reconnecting…",
      offline: "offline",
    };
    badge.dataset.state = shown;
    badge.textContent = labels[shown] ?? shown;
    badge.title = reason ?? "";
    if (state === "offline" && this.client.stopCode === 4404) {
      this.showNotFound();
      return;
    }
    const banner = $("banner");
    if (state === "offline" && reason && reason !== "closed") {
      banner.textContent = `Disconnected: ${reason}.`;
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
    this.updateComposer();
  }

  /** An unknown (deleted, expired, mistyped) conversation: a clean page, nothing else. */
  showNotFound() {
    document.body.dataset.notFound = "true";
    $("conversation").classList.add("missing");
    $("not-found").hidden = false;
    for (const id of ["composer", "view-only", "share", "jump-to-latest", "banner", "name-button", "people"])
      $(id).hidden = true;
    document.title = "Not found · costream";
    forgetConversation(this.conversationId);
  }

  showPresence(viewers, people) {
    const n = Number(viewers) || 0;
    const presence = $("presence");
    presence.textContent = `${n} watching`;
    presence.dataset.viewers = String(n);
    showPeople($("people"), people, n, this.viewerId);
  }

  showTotal() {
    const total = formatCost(this.model.totalCostUsd);
    const badge = $("total-cost");
    badge.hidden = total == null;
    if (total) badge.textContent = `${total} total`;
  }

  // --- rendering ---

  scheduleRender() {
    if (this.renderScheduled) return;
    const run = () => {
      if (!this.renderScheduled) return;
      cancelAnimationFrame(this.renderScheduled.frame);
      clearTimeout(this.renderScheduled.timer);
      this.renderScheduled = null;
      this.renderNow();
    };
    // While replaying, draw now and then so a long replay shows progress; live, once per
    // frame. The timer also covers pages whose frames the browser throttles (hidden tabs).
    const delay = this.caughtUp ? 100 : 250;
    this.renderScheduled = {
      frame: this.caughtUp ? requestAnimationFrame(run) : 0,
      timer: setTimeout(run, delay),
    };
  }

  renderNow() {
    if (this.renderScheduled) {
      cancelAnimationFrame(this.renderScheduled.frame);
      clearTimeout(this.renderScheduled.timer);
      this.renderScheduled = null;
    }
    this.renders += 1;
    this.renderer.render();
    $("empty").hidden = this.model.runs.length > 0;
    this.showTotal();
    this.updateComposer();
    if (this.stick) this.scrollToBottom();
    this.updateJump();
  }

  // --- scrolling ---

  bindScroll() {
    const scroller = this.scroller;
    scroller.addEventListener(
      "scroll",
      () => {
        const top = scroller.scrollTop;
        if (this.distanceFromBottom() <= 24) this.stick = true;
        else if (top < this.lastScrollTop) this.stick = false; // the reader went up
        this.lastScrollTop = top;
        this.updateJump();
      },
      { passive: true },
    );
    // The view changes size without a scroll (the composer or "view only" appears, the
    // phone rotates): stay at the bottom if that is where the reader was.
    const keep = new ResizeObserver(() => {
      if (this.stick) this.scrollToBottom();
      this.updateJump();
    });
    keep.observe(scroller);
    keep.observe(this.log);
    $("jump-to-latest").addEventListener("click", () => {
      this.stick = true;
      this.scrollToBottom();
      this.updateJump();
      this.scroller.focus({ preventScroll: true });
    });
  }

  distanceFromBottom() {
    const s = this.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight;
  }

  scrollToBottom() {
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.lastScrollTop = this.scroller.scrollTop;
  }

  updateJump() {
    $("jump-to-latest").hidden = this.stick || this.distanceFromBottom() <= 24;
  }

  // --- composer ---

  bindComposer() {
    const form = $("composer");
    const input = $("composer-input");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    $("stop").addEventListener("click", () => {
      if (!this.client.cancel()) this.showComposerError("Not connected.");
    });
  }

  send() {
    const input = $("composer-input");
    const content = input.value;
    if (!content.trim() || this.pending || this.model.running) return;
    $("composer-error").hidden = true;
    if (!this.client.send(content)) {
      this.showComposerError("Not connected; try again in a moment.");
      return;
    }
    this.pending = true;
    this.refocus = document.activeElement === input;
    input.value = "";
    this.stick = true;
    this.updateComposer();
  }

  hasRun(runId) {
    const runs = this.model.runs;
    for (let i = runs.length - 1; i >= 0 && i >= runs.length - 3; i--) {
      if (runs[i].runId === runId) return true;
    }
    return false;
  }

  showComposerError(message) {
    const error = $("composer-error");
    error.textContent = message;
    error.hidden = false;
  }

  updateComposer() {
    if (this.role !== "writer") return;
    if (this.pending && this.pendingRunId != null && this.hasRun(this.pendingRunId)) {
      this.pending = false;
      this.pendingRunId = null;
    }
    const running = this.model.running;
    const busy = running || this.pending || this.client.state !== "live";
    const input = $("composer-input");
    input.disabled = busy;
    input.placeholder = running
      ? "The model is answering… (Stop cancels it)"
      : "Message (Enter sends, Shift+Enter for a new line)";
    $("send").disabled = busy;
    $("stop").hidden = !running;
    $("composer").dataset.running = String(running);
    if (!busy && this.refocus) {
      this.refocus = false;
      input.focus();
    }
  }

  // --- files ---

  bindFiles() {
    const dialog = $("file-viewer");
    $("file-viewer-close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close(); // a click on the backdrop
    });
  }

  refreshFilesSoon(delay = 150) {
    this.filesSeen = this.model.workspaceChanges;
    clearTimeout(this.filesTimer);
    this.filesTimer = setTimeout(() => this.refreshFiles(), delay);
  }

  async refreshFiles() {
    let files;
    try {
      const answer = await this.api("/files");
      if (!answer.ok) return;
      files = await answer.json();
    } catch {
      return;
    }
    const list = $("file-list");
    list.replaceChildren(
      ...files.map((file) => {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "file";
        button.dataset.testid = "file";
        button.dataset.path = file.path;
        const name = document.createElement("span");
        name.className = "file-name";
        name.textContent = file.path;
        const size = document.createElement("span");
        size.className = "file-size muted";
        size.textContent = formatSize(file.size);
        button.append(name, size);
        button.addEventListener("click", () => this.openFile(file.path));
        const item = document.createElement("li");
        item.append(button);
        return item;
      }),
    );
    $("file-count").textContent = `(${files.length})`;
    $("files-empty").hidden = files.length > 0;
  }

  async openFile(path) {
    const dialog = $("file-viewer");
    $("file-viewer-title").textContent = path;
    const text = $("file-text");
    text.textContent = "Loading…";
    if (!dialog.open) dialog.showModal();
    try {
      const encoded = path.split("/").map(encodeURIComponent).join("/");
      const answer = await this.api(`/files/${encoded}`);
      text.textContent = answer.ok ? await answer.text() : `Could not load (${answer.status}).`;
    } catch {
      text.textContent = "Could not load the file.";
    }
  }

  /** What tests and benchmarks reach through `window.__costream`. */
  testHook() {
    return {
      page: this,
      model: this.model,
      client: this.client,
      /** Apply crafted events directly (no socket) and draw them now. */
      apply: (events) => {
        for (const event of events) this.model.apply(event);
        this.caughtUp = true;
        this.renderer.live = true;
        this.renderNow();
      },
      /** Apply events as a replay would arrive: all into the model, one draw. */
      replay: (events) => {
        this.onReset();
        for (const event of events) this.model.apply(event);
        this.caughtUp = true;
        this.renderer.live = true;
        this.renderNow();
      },
      /** Stream events live at the page's own pace: applied, drawn on the next frame. */
      push: (event) => {
        this.model.apply(event);
        this.scheduleRender();
      },
      dropConnection: () => this.client.dropConnection(),
      state: () => ({
        lastSeq: this.client.lastSeq,
        epoch: this.client.epoch,
        connection: this.client.state,
        caughtUp: this.caughtUp,
        renders: this.renders,
        welcomes: this.client.welcomes,
        mode: this.client.mode,
        lastError: this.lastError ?? null,
      }),
    };
  }
}

function main() {
  const match = location.pathname.match(/^\/c\/([^/]+)\/?$/);
  if (!match) {
    startPage();
    return;
  }
  const token = new URLSearchParams(location.hash.slice(1)).get("t");
  const conversationId = decodeURIComponent(match[1]);
  const page = new ConversationPage(conversationId, token ?? "");
  window.__costream = page.testHook();
  // Pasting the other link (view vs write) only changes the fragment: load it afresh.
  addEventListener("hashchange", () => location.reload());
  if (!token) {
    $("conversation").hidden = false;
    const banner = $("banner");
    banner.textContent = "This link has no token (#t=…): ask for the conversation's link.";
    banner.hidden = false;
    $("connection").textContent = "offline";
    $("connection").dataset.state = "offline";
    return;
  }
  page.start();
}

main();
