"use strict";
// The reformer-chat page: REST for the conversation list, history pages, regenerate, edit and export;
// the websocket for streamed replies. The list comes from the server (GET /v1/sessions), so the same key
// sees the same conversations in any browser; only the key and the open conversation stay in this one.
// Model text only ever goes into the page as text (Text nodes, or markdown.js's DOM), never parsed as HTML.
(() => {
  const STORE = {
    apiKey: "reformer-chat.apiKey",
    current: "reformer-chat.current",
  };
  const TITLE_CHARS = 40;
  const MAX_RECONNECT_MS = 10000;
  const PAGE_MESSAGES = 30; // history loads by this many messages, older ones as you scroll up
  const LIST_PAGES = 5; // the sidebar shows up to this many pages of 50 conversations

  const $ = (id) => document.getElementById(id);
  const el = {
    newChat: $("new-chat"), conversations: $("conversations"), noConversations: $("no-conversations"),
    keyForm: $("key-form"), apiKey: $("api-key"), showKey: $("show-key"), modelName: $("model-name"),
    title: $("chat-title"), connection: $("connection"), context: $("context-size"), banner: $("banner"),
    messages: $("messages"), empty: $("empty"), composer: $("composer"), input: $("input"),
    send: $("send"), stop: $("stop"), exportMd: $("export-md"), exportJson: $("export-json"),
    editing: $("editing"), cancelEdit: $("cancel-edit"),
  };

  const load = (name, fallback) => {
    try {
      const raw = localStorage.getItem(name);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  };
  const save = (name, value) => localStorage.setItem(name, JSON.stringify(value));

  let apiKey = load(STORE.apiKey, "");
  let conversations = []; // [{id, title}], last updated first, from the server
  let currentId = load(STORE.current, null);
  let olderBefore = null; // the oldest shown message's id while older ones exist on the server
  let loadingOlder = false;
  let editing = false; // the composer holds a new text for the last user message
  let socket = null; // the websocket of the current conversation
  let socketReady = null; // resolves when `socket` opens, rejects if it closes first
  let reconnectTimer = null;
  let reconnectDelay = 1000;
  let connectionLost = false;
  let busy = false; // a message is sent and its reply not finished
  let sending = false; // send() is waiting for a new chat or the connection
  let pending = null; // the user's message node until the server starts replying
  let streaming = null; // the assistant message node being streamed
  // Conversation changes (new chat, a click in the list) run one after another, and send() waits for
  // the last one: a message typed while a new chat is being created goes to that chat, not the old one.
  let switching = Promise.resolve();
  const queueSwitch = (change) => {
    const run = switching.then(change);
    switching = run.catch(() => {});
    return run;
  };

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // --- HTTP -------------------------------------------------------------------------------------
  async function api(method, path, body) {
    const headers = {};
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch {
      throw new ApiError(0, "unreachable", "Cannot reach the server: check that it is running, then try again.");
    }
    if (response.status === 204) return null;
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(response.status, error.code || "http_error",
        error.message || `The server answered ${response.status}.`);
    }
    return data;
  }

  // --- messages and status --------------------------------------------------------------------------
  function showError(message) {
    el.banner.textContent = message;
    el.banner.hidden = false;
  }

  function clearError() {
    el.banner.hidden = true;
    el.banner.textContent = "";
  }

  function askForKey(message) {
    el.keyForm.hidden = false;
    showError(message);
    el.apiKey.focus();
  }

  function handleError(err) {
    if (err.status === 401) {
      askForKey(apiKey ? "The server refused the saved API key: enter a valid one in the sidebar."
        : "This server requires an API key: enter it in the sidebar.");
    } else {
      showError(err.message);
    }
  }

  function setConnection(state, text) {
    el.connection.dataset.state = state;
    el.connection.textContent = text;
  }

  function setContext(tokens) {
    el.context.textContent = tokens == null ? "" : `context: ${tokens} tokens`;
  }

  function setBusy(value) {
    busy = value;
    el.send.hidden = value;
    el.stop.hidden = !value;
    updateActions();
  }

  function scrollDown() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function clearMessages() {
    el.messages.replaceChildren(el.empty);
    el.empty.hidden = false;
    pending = streaming = null;
    olderBefore = null;
    stopEditing();
  }

  function setReason(node, reason) {
    const meta = node.querySelector(".meta");
    const badge = document.createElement("span");
    badge.className = "reason";
    badge.dataset.reason = reason;
    badge.textContent = reason;
    meta.replaceChildren("finish: ", badge);
  }

  // A message node: its raw text in data-text (what Copy copies); a reply's bubble shows it as Markdown.
  function messageNode(role, text, finishReason, id) {
    const node = document.createElement("div");
    node.className = `message ${role}`;
    if (id) node.dataset.id = id;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    node.append(bubble);
    setText(node, text);
    if (role === "assistant") {
      const meta = document.createElement("div");
      meta.className = "meta";
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy link small";
      copy.textContent = "Copy";
      copy.addEventListener("click", () => copyText(node, copy));
      node.append(meta, copy);
      if (finishReason) setReason(node, finishReason);
    }
    return node;
  }

  function setText(node, text) {
    node.dataset.text = text;
    const bubble = node.querySelector(".bubble");
    if (node.classList.contains("assistant")) bubble.replaceChildren(window.renderMarkdown(text));
    else bubble.textContent = text;
  }

  function addMessage(role, text, finishReason, id) {
    el.empty.hidden = true;
    const node = messageNode(role, text, finishReason, id);
    el.messages.append(node);
    updateActions();
    scrollDown();
    return node;
  }

  async function copyText(node, button) {
    try {
      await navigator.clipboard.writeText(node.dataset.text);
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    } catch {
      showError("The browser did not allow copying to the clipboard.");
    }
  }

  // Regenerate sits on the last reply, Edit on the last user message; only when nothing is running.
  function updateActions() {
    for (const old of el.messages.querySelectorAll(".action")) old.remove();
    if (busy) return;
    const nodes = el.messages.querySelectorAll(".message");
    const last = nodes[nodes.length - 1];
    const users = el.messages.querySelectorAll(".message.user");
    const lastUser = users[users.length - 1];
    if (last && last.classList.contains("assistant")) {
      last.append(actionButton("regenerate", "Regenerate", regenerate));
    }
    if (lastUser) lastUser.append(actionButton("edit", "Edit", startEdit));
  }

  function actionButton(name, label, handler) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `action ${name} link small`;
    button.textContent = label;
    button.addEventListener("click", handler);
    return button;
  }

  function finishStreaming(reason) {
    if (!streaming) return;
    streaming.classList.remove("streaming");
    if (reason) setReason(streaming, reason);
    streaming = null;
    updateActions();
  }

  // --- conversations ------------------------------------------------------------------------------
  function titleFrom(text) {
    const line = text.trim().split("\n")[0];
    return line.length > TITLE_CHARS ? `${line.slice(0, TITLE_CHARS - 1)}…` : line;
  }

  function saveConversations() {
    renderConversations();
  }

  // The list as the server has it (newest first); a conversation being created or answered keeps its
  // local title until the server's arrives.
  async function refreshConversations() {
    const fetched = [];
    let cursor = null;
    for (let page = 0; page < LIST_PAGES; page += 1) {
      const query = cursor ? `?limit=50&cursor=${encodeURIComponent(cursor)}` : "?limit=50";
      const list = await api("GET", `/v1/sessions${query}`);
      for (const s of list.sessions) fetched.push({ id: s.session_id, title: titleFrom(s.title) });
      cursor = list.next_cursor;
      if (!cursor) break;
    }
    conversations = fetched;
    renderConversations();
  }

  function moveToTop(id) {
    const index = conversations.findIndex((c) => c.id === id);
    if (index > 0) conversations.unshift(...conversations.splice(index, 1));
    renderConversations();
  }

  function renderConversations() {
    el.conversations.replaceChildren();
    for (const conversation of conversations) {
      const item = document.createElement("li");
      item.className = conversation.id === currentId ? "conversation active" : "conversation";
      item.dataset.id = conversation.id;
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.textContent = conversation.title || "New chat";
      open.title = conversation.title || "New chat";
      open.addEventListener("click", () => queueSwitch(() => selectConversation(conversation.id)));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "delete";
      remove.textContent = "✕";
      remove.setAttribute("aria-label", `Delete ${conversation.title || "this chat"}`);
      remove.addEventListener("click", () => deleteConversation(conversation.id));
      item.append(open, remove);
      el.conversations.append(item);
    }
    el.noConversations.hidden = conversations.length > 0;
  }

  function forget(id) {
    conversations = conversations.filter((c) => c.id !== id);
    if (currentId === id) {
      currentId = null;
      save(STORE.current, null);
      disconnect();
      clearMessages();
      setBusy(false);
      el.title.textContent = "New chat";
      setContext(null);
    }
    saveConversations();
  }

  async function selectConversation(id) {
    if (busy && socket) socket.send(JSON.stringify({ type: "cancel" }));
    setBusy(false);
    disconnect();
    currentId = id;
    save(STORE.current, id);
    renderConversations();
    clearMessages();
    clearError();
    setContext(null);
    const conversation = conversations.find((c) => c.id === id);
    el.title.textContent = (conversation && conversation.title) || "New chat";
    try {
      const page = await api("GET", `/v1/sessions/${encodeURIComponent(id)}/messages?limit=${PAGE_MESSAGES}`);
      if (currentId !== id) return;
      for (const m of page.messages) addMessage(m.role, m.content, m.finish_reason, m.id);
      olderBefore = page.has_more && page.messages.length ? page.messages[0].id : null;
      setContext(page.context_tokens);
      scrollDown();
    } catch (err) {
      if (err.status === 404) {
        forget(id);
        showError("That conversation is gone: it expired or was deleted on the server.");
        return;
      }
      handleError(err);
      if (err.status === 401) return;
    }
    if (currentId === id) connect(id);
  }

  function newChat() {
    return queueSwitch(createChat);
  }

  // Older messages, when the view is scrolled to the top: prepended without moving what is on screen.
  async function loadOlder() {
    if (!olderBefore || loadingOlder || el.messages.scrollTop > 40) return;
    loadingOlder = true;
    const id = currentId;
    try {
      const path = `/v1/sessions/${encodeURIComponent(id)}/messages?limit=${PAGE_MESSAGES}`
        + `&before=${encodeURIComponent(olderBefore)}`;
      const page = await api("GET", path);
      if (currentId !== id) return;
      const height = el.messages.scrollHeight;
      const nodes = page.messages.map((m) => messageNode(m.role, m.content, m.finish_reason, m.id));
      el.empty.after(...nodes);
      el.messages.scrollTop += el.messages.scrollHeight - height;
      olderBefore = page.has_more && page.messages.length ? page.messages[0].id : null;
    } catch (err) {
      handleError(err);
    } finally {
      loadingOlder = false;
    }
  }

  async function createChat() {
    clearError();
    try {
      const session = await api("POST", "/v1/sessions");
      conversations.unshift({ id: session.session_id, title: "" });
      saveConversations();
      await selectConversation(session.session_id);
      el.input.focus();
      return session.session_id;
    } catch (err) {
      handleError(err);
      return null;
    }
  }

  async function deleteConversation(id) {
    try {
      await api("DELETE", `/v1/sessions/${encodeURIComponent(id)}`);
    } catch (err) {
      if (err.status !== 404) {
        handleError(err);
        return;
      }
    }
    forget(id);
  }

  // --- websocket ----------------------------------------------------------------------------------
  function socketUrl(id) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const query = apiKey ? `?api_key=${encodeURIComponent(apiKey)}` : "";
    return `${scheme}://${location.host}/v1/sessions/${encodeURIComponent(id)}/stream${query}`;
  }

  function connect(id) {
    disconnect();
    setConnection("connecting", "connecting…");
    const ws = new WebSocket(socketUrl(id));
    socket = ws;
    socketReady = new Promise((resolve, reject) => {
      ws.addEventListener("open", resolve, { once: true });
      ws.addEventListener("close", reject, { once: true });
    });
    socketReady.catch(() => {}); // a failed connection is reported by onclose
    ws.onopen = () => {
      if (ws !== socket) return;
      reconnectDelay = 1000;
      setConnection("open", "connected");
      if (connectionLost) {
        connectionLost = false;
        clearError();
      }
    };
    ws.onmessage = (event) => {
      if (ws === socket) onFrame(JSON.parse(event.data));
    };
    ws.onclose = (event) => {
      if (ws === socket) onClosed(id, event);
    };
  }

  function disconnect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    const ws = socket;
    socket = socketReady = null;
    if (ws) ws.close();
    setConnection("idle", "not connected");
  }

  function onClosed(id, event) {
    socket = socketReady = null;
    finishStreaming("interrupted");
    if (pending) restorePending();
    setBusy(false);
    if (event.code === 1008) { // refused: the error frame before it said why
      setConnection("lost", "refused");
      if (event.reason === "session_not_found") forget(id);
      return;
    }
    connectionLost = true;
    setConnection("lost", "reconnecting…");
    showError("Lost the connection to the server. Reconnecting…");
    reconnectTimer = setTimeout(() => {
      if (currentId === id) connect(id);
    }, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, MAX_RECONNECT_MS);
  }

  // The message was refused before the reply began: take it off the page and give it back to edit.
  function restorePending() {
    const text = pending.dataset.text;
    pending.remove();
    pending = null;
    if (!el.input.value) el.input.value = text;
    if (!el.messages.querySelector(".message")) el.empty.hidden = false;
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "start":
        pending = null;
        streaming = addMessage("assistant", "");
        streaming.classList.add("streaming");
        break;
      case "token":
        if (streaming) {
          setText(streaming, streaming.dataset.text + frame.text); // re-rendered: never parsed as HTML
          scrollDown();
        }
        break;
      case "done":
        if (streaming && frame.message.id) streaming.dataset.id = frame.message.id;
        finishStreaming(frame.message.finish_reason);
        setContext(frame.usage.context_tokens);
        setBusy(false);
        moveToTop(currentId);
        break;
      case "error": {
        const error = frame.error || {};
        if (error.code === "unauthorized") askForKey(error.message);
        else showError(error.message || "The server reported an error.");
        if (error.code === "session_busy" && streaming) break; // our reply is still coming
        finishStreaming(null);
        if (pending) restorePending();
        setBusy(false);
        break;
      }
      default:
        break;
    }
  }

  // --- composer -----------------------------------------------------------------------------------
  async function send() {
    const text = el.input.value;
    if (!text.trim() || busy || sending) return;
    sending = true; // a second Enter while this one waits for a connection is ignored
    try {
      if (editing) await saveEdit(text);
      else await deliver(text);
    } finally {
      sending = false;
    }
  }

  // Regenerate and edit run over REST: the server cuts the history back and answers again in one turn.
  async function rewrite(route, body, userText) {
    const id = currentId;
    clearError();
    setBusy(true);
    const replies = el.messages.querySelectorAll(".message.assistant");
    const lastReply = replies[replies.length - 1];
    if (lastReply) lastReply.classList.add("streaming");
    try {
      const reply = await api("POST", `/v1/sessions/${encodeURIComponent(id)}/${route}`, body);
      if (currentId !== id) return;
      if (userText !== undefined) {
        const users = el.messages.querySelectorAll(".message.user");
        const lastUser = users[users.length - 1];
        for (let n = lastUser.nextElementSibling; n;) { const next = n.nextElementSibling; n.remove(); n = next; }
        setText(lastUser, userText);
        addMessage("assistant", reply.message.content, reply.message.finish_reason, reply.message.id);
      } else if (lastReply) {
        lastReply.remove();
        addMessage("assistant", reply.message.content, reply.message.finish_reason, reply.message.id);
      }
      setContext(reply.usage.context_tokens);
      moveToTop(id);
    } catch (err) {
      if (lastReply) lastReply.classList.remove("streaming");
      handleError(err);
    } finally {
      setBusy(false);
    }
  }

  function regenerate() {
    if (!busy) rewrite("regenerate", {});
  }

  function startEdit() {
    const users = el.messages.querySelectorAll(".message.user");
    if (!users.length || busy) return;
    editing = true;
    el.input.value = users[users.length - 1].dataset.text;
    el.editing.hidden = false;
    el.send.textContent = "Save";
    el.input.focus();
  }

  function stopEditing() {
    editing = false;
    el.editing.hidden = true;
    el.send.textContent = "Send";
  }

  async function saveEdit(text) {
    stopEditing();
    el.input.value = "";
    await rewrite("edit", { content: text }, text);
  }

  async function exportConversation(format) {
    if (!currentId) return;
    const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
    try {
      const response = await fetch(`/v1/sessions/${encodeURIComponent(currentId)}/export?format=${format}`, { headers });
      if (!response.ok) throw new ApiError(response.status, "export", `Export failed: the server answered ${response.status}.`);
      const name = (response.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await response.blob());
      link.download = name ? name[1] : `conversation.${format === "markdown" ? "md" : "json"}`;
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (err) {
      handleError(err instanceof ApiError ? err : new ApiError(0, "unreachable", "Cannot reach the server."));
    }
  }

  async function deliver(text) {
    clearError();
    await switching;
    if (!currentId && !(await newChat())) return;
    try {
      if (!socketReady) throw new Error("no socket");
      await socketReady;
    } catch {
      showError("Not connected to the server: the message was not sent. Reconnecting…");
      return;
    }
    const conversation = conversations.find((c) => c.id === currentId);
    if (conversation && !conversation.title) {
      conversation.title = titleFrom(text);
      el.title.textContent = conversation.title;
      saveConversations();
    }
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      showError("Not connected to the server: the message was not sent. Reconnecting…");
      return;
    }
    el.input.value = "";
    pending = addMessage("user", text);
    setBusy(true);
    socket.send(JSON.stringify({ type: "message", content: text }));
  }

  function stop() {
    if (socket && busy) socket.send(JSON.stringify({ type: "cancel" }));
  }

  async function saveKey(event) {
    event.preventDefault();
    apiKey = el.apiKey.value.trim();
    save(STORE.apiKey, apiKey);
    el.keyForm.hidden = true;
    clearError();
    await start();
  }

  async function start() {
    try {
      await refreshConversations();
    } catch (err) {
      handleError(err);
    }
    // Queued at once, not after /v1/models answers: a message sent meanwhile waits for the saved
    // conversation to be opened instead of finding it without a connection. (A 401 there asks for the key.)
    const id = currentId;
    const restoring = id && conversations.some((c) => c.id === id)
      ? queueSwitch(() => selectConversation(id)) : null;
    try {
      const models = await api("GET", "/v1/models");
      el.modelName.textContent = `model: ${models.data[0].id}`;
    } catch (err) {
      handleError(err);
    }
    await restoring;
  }

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  el.input.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && editing) {
      stopEditing();
      el.input.value = "";
    } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  el.stop.addEventListener("click", stop);
  el.messages.addEventListener("scroll", loadOlder);
  el.exportMd.addEventListener("click", () => exportConversation("markdown"));
  el.exportJson.addEventListener("click", () => exportConversation("json"));
  el.cancelEdit.addEventListener("click", () => { stopEditing(); el.input.value = ""; });
  el.newChat.addEventListener("click", newChat);
  el.keyForm.addEventListener("submit", saveKey);
  el.showKey.addEventListener("click", () => {
    el.keyForm.hidden = !el.keyForm.hidden;
    el.apiKey.value = apiKey;
  });
  start();
})();
