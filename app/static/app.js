"use strict";
// The reformer-chat page: REST for sessions and history, the websocket for streamed replies.
// Model text only ever goes into the page as text (textContent / Text nodes), never parsed as HTML.
(() => {
  const STORE = {
    apiKey: "reformer-chat.apiKey",
    conversations: "reformer-chat.conversations", // [{id, title}], newest first
    current: "reformer-chat.current",
  };
  const TITLE_CHARS = 40;
  const MAX_RECONNECT_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const el = {
    newChat: $("new-chat"), conversations: $("conversations"), noConversations: $("no-conversations"),
    keyForm: $("key-form"), apiKey: $("api-key"), showKey: $("show-key"), modelName: $("model-name"),
    title: $("chat-title"), connection: $("connection"), context: $("context-size"), banner: $("banner"),
    messages: $("messages"), empty: $("empty"), composer: $("composer"), input: $("input"),
    send: $("send"), stop: $("stop"),
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
  let conversations = load(STORE.conversations, []);
  let currentId = load(STORE.current, null);
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
  }

  function scrollDown() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function clearMessages() {
    el.messages.replaceChildren(el.empty);
    el.empty.hidden = false;
    pending = streaming = null;
  }

  function setReason(node, reason) {
    const meta = node.querySelector(".meta");
    const badge = document.createElement("span");
    badge.className = "reason";
    badge.dataset.reason = reason;
    badge.textContent = reason;
    meta.replaceChildren("finish: ", badge);
  }

  function addMessage(role, text, finishReason) {
    el.empty.hidden = true;
    const node = document.createElement("div");
    node.className = `message ${role}`;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = text;
    node.append(bubble);
    if (role === "assistant") {
      const meta = document.createElement("div");
      meta.className = "meta";
      node.append(meta);
      if (finishReason) setReason(node, finishReason);
    }
    el.messages.append(node);
    scrollDown();
    return node;
  }

  function finishStreaming(reason) {
    if (!streaming) return;
    streaming.classList.remove("streaming");
    if (reason) setReason(streaming, reason);
    streaming = null;
  }

  // --- conversations ------------------------------------------------------------------------------
  function titleFrom(text) {
    const line = text.trim().split("\n")[0];
    return line.length > TITLE_CHARS ? `${line.slice(0, TITLE_CHARS - 1)}…` : line;
  }

  function saveConversations() {
    save(STORE.conversations, conversations);
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
      const session = await api("GET", `/v1/sessions/${encodeURIComponent(id)}`);
      if (currentId !== id) return;
      for (const message of session.messages) addMessage(message.role, message.content, message.finish_reason);
      setContext(session.context_tokens);
      const first = session.messages.find((m) => m.role === "user");
      if (conversation && !conversation.title && first) {
        conversation.title = titleFrom(first.content);
        el.title.textContent = conversation.title;
        saveConversations();
      }
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
    const text = pending.querySelector(".bubble").textContent;
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
          streaming.querySelector(".bubble").append(frame.text); // a Text node: never HTML
          scrollDown();
        }
        break;
      case "done":
        finishStreaming(frame.message.finish_reason);
        setContext(frame.usage.context_tokens);
        setBusy(false);
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
      await deliver(text);
    } finally {
      sending = false;
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
    renderConversations();
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
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  el.stop.addEventListener("click", stop);
  el.newChat.addEventListener("click", newChat);
  el.keyForm.addEventListener("submit", saveKey);
  el.showKey.addEventListener("click", () => {
    el.keyForm.hidden = !el.keyForm.hidden;
    el.apiKey.value = apiKey;
  });
  start();
})();
