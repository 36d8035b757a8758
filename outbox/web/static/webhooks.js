// Settings > Webhooks: the page a portal link opens.
//
// Plain JavaScript, no framework, no build. It calls the admin JSON API with the
// session cookie the link set, and sends the session's CSRF token (from the page's
// <meta>) with every change. Inside another site's iframe no cookie can be relied on:
// there the page comes with its session in a <meta>, kept in memory only and sent as
// X-Outbox-Session. Every string that comes from a person or a server is put
// on the page with textContent or as an attribute value set through the DOM, never
// parsed as HTML.
(() => {
  "use strict";

  const LIMIT = 10;
  const API = "../api/v1";
  const LIST_POLL_MS = 5000;
  const LOG_POLL_MS = 3000;
  const csrfToken = document.querySelector('meta[name="outbox-csrf-token"]').content;
  const sessionMeta = document.querySelector('meta[name="outbox-session"]');
  const sessionToken = sessionMeta.content;
  sessionMeta.remove();
  // Attempts in one series of a delivery: the first and its retries (OUTBOX_RETRY_DELAYS).
  const MAX_ATTEMPTS = Number(document.querySelector('meta[name="outbox-max-attempts"]').content);

  const $ = (id) => document.getElementById(id);

  const state = {
    events: [], // [{name, display_name}]
    webhooks: [],
    listSignature: "",
    editing: null, // the webhook in the edit dialog; null when adding
    formatPicked: false, // the user chose the format in the dialog by hand
    deleting: null,
    log: { hook: null, deliveries: [], cursor: null, signature: "" },
    opener: null,
    ended: false,
  };

  // ---------------------------------------------------------------- building DOM

  // el("td", {class: "x", text: "..."}, child, "text", ...): attributes are set with
  // setAttribute and text with text nodes, so nothing is ever parsed as HTML.
  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key === "data") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  // Rebuild a container's children without losing the keyboard focus: the element
  // that had it is found again by its data-key.
  function replaceKeepingFocus(container, children) {
    const active = document.activeElement;
    const key = active && container.contains(active) ? active.dataset.key : null;
    container.replaceChildren(...children);
    if (key) {
      const again = container.querySelector(`[data-key="${CSS.escape(key)}"]`);
      if (again) again.focus();
    }
  }

  // ---------------------------------------------------------------- time and words

  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const absolute = new Intl.DateTimeFormat(undefined, {
    dateStyle: "medium",
    timeStyle: "medium",
  });

  function ago(iso) {
    const seconds = (Date.parse(iso) - Date.now()) / 1000;
    const size = Math.abs(seconds);
    if (size < 45)
      return seconds > 0 ? relative.format(Math.max(1, Math.round(seconds)), "second") : "just now";
    if (size < 45 * 60) return relative.format(Math.round(seconds / 60), "minute");
    if (size < 22 * 3600) return relative.format(Math.round(seconds / 3600), "hour");
    return relative.format(Math.round(seconds / 86400), "day");
  }

  function agoOrNone(iso) {
    return iso ? ago(iso) : "";
  }

  function timeEl(iso, prefix) {
    const when = new Date(iso);
    return el("time", {
      datetime: iso,
      title: absolute.format(when),
      text: prefix ? `${prefix} ${ago(iso)}` : ago(iso),
    });
  }

  // A URL as text that may wrap after each "/" of its path rather than mid-word.
  function urlText(url) {
    const node = el("span", { class: "url" });
    const start = url.indexOf("://") + 3; // 2 when there is no scheme
    const scheme = start > 2 ? url.slice(0, start) : "";
    node.append(scheme);
    for (const part of url.slice(scheme.length).split(/(?<=\/)/)) node.append(part, el("wbr"));
    return node;
  }

  function displayName(event) {
    const found = state.events.find((e) => e.name === event);
    return found ? found.display_name : event;
  }

  const STATUS_WORDS = {
    succeeded: "Succeeded",
    failed: "Failed",
    pending: "Pending",
    cancelled: "Cancelled",
  };

  // ---------------------------------------------------------------- the API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // The value of a datetime-local input for ``date``, in the browser's time zone.
  function localInput(date) {
    const pad = (n) => String(n).padStart(2, "0");
    return (
      `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}` +
      `T${pad(date.getHours())}:${pad(date.getMinutes())}`
    );
  }

  async function call(method, path, body) {
    const init = {
      method,
      headers: { Accept: "application/json" },
      credentials: "same-origin",
      cache: "no-store",
    };
    if (method !== "GET") init.headers["X-CSRF-Token"] = csrfToken;
    if (sessionToken) init.headers["X-Outbox-Session"] = sessionToken;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(API + path, init);
    } catch {
      throw new ApiError(
        0,
        "network",
        "Cannot reach the server. Check your connection and try again.",
      );
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      const message = error.message || `The server answered ${response.status}. Try again.`;
      if (response.status === 401) sessionEnded();
      throw new ApiError(response.status, error.code || "http_error", message);
    }
    return data;
  }

  function sessionEnded() {
    if (state.ended) return;
    state.ended = true;
    for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
    banner(
      "Your session has ended. Go back to your account and open Settings > Webhooks " +
        "again to get a new link.",
    );
    for (const control of document.querySelectorAll("main button, main input")) {
      control.disabled = true;
    }
  }

  function banner(message) {
    const node = $("banner");
    node.textContent = message;
    show(node, Boolean(message));
  }

  function notice(message) {
    $("notice").textContent = message;
  }

  // ---------------------------------------------------------------- the list

  async function loadList() {
    if (state.ended) return;
    try {
      const data = await call("GET", "/webhooks");
      state.webhooks = data.webhooks;
      if (!state.ended) banner("");
    } catch (error) {
      if (error.status !== 401) banner(`The webhooks could not be loaded: ${error.message}`);
      return;
    }
    renderList();
  }

  function renderList() {
    // Relative times change by themselves, so they are part of what is compared.
    const signature =
      JSON.stringify(state.webhooks) +
      state.webhooks
        .map((h) =>
          [h.last_delivery_at, h.last_attempt_at, h.next_retry_at, h.failing_since].map(agoOrNone),
        )
        .join();
    if (signature === state.listSignature) return;
    state.listSignature = signature;

    const count = state.webhooks.length;
    $("usage").textContent = `${count} of ${LIMIT} used`;
    const full = count >= LIMIT;
    $("add-webhook").disabled = full || state.ended;
    show($("limit-note"), full);
    show($("empty"), count === 0);
    show($("webhooks"), count > 0);
    replaceKeepingFocus($("webhook-rows"), state.webhooks.map(row));
  }

  // "next attempt in 9 minutes (attempt 3 of 4)": the soonest retry of the webhook's
  // deliveries, and which attempt of its series it will be.
  function nextRetryText(hook) {
    if (!hook.next_retry_at) return "";
    const due = Date.parse(hook.next_retry_at) <= Date.now();
    const when = due ? "next attempt now" : `next attempt ${ago(hook.next_retry_at)}`;
    if (!hook.next_retry_attempt) return when;
    return `${when} (attempt ${hook.next_retry_attempt} of ${MAX_ATTEMPTS})`;
  }

  // "Failing since 2 hours ago · 4 waiting · 10 failed": the story of a failing streak.
  function streakLine(hook) {
    if (!hook.failing_since) return null;
    const words = [`Failing since ${ago(hook.failing_since)}`];
    if (hook.pending > 0) words.push(`${hook.pending} waiting`);
    if (hook.failed_in_streak > 0) words.push(`${hook.failed_in_streak} failed`);
    return el("span", {
      class: "streak",
      title: absolute.format(new Date(hook.failing_since)),
      text: words.join(" · "),
    });
  }

  function statusCell(hook) {
    if (!hook.enabled && hook.disabled_reason) {
      return [
        el("span", { class: "status failed", text: "Disabled: kept failing" }),
        el("span", { class: "reason", text: hook.disabled_reason }),
        streakLine(hook),
        el("span", {
          class: "how-back",
          text:
            "Fix the endpoint, then switch Enabled back on. Deliveries that failed " +
            "meanwhile can be sent again from the delivery log.",
        }),
      ];
    }
    if (hook.retrying > 0) {
      const words = [];
      if (hook.last_attempt_status === "failed" && hook.last_attempt_error) {
        words.push(hook.last_attempt_error);
      }
      const next = nextRetryText(hook);
      if (next) words.push(next);
      const parts = [
        el("span", { class: "status retrying", text: "Retrying" }),
        words.length
          ? el("span", { class: "reason retrying-reason", text: words.join(" · ") })
          : null,
        streakLine(hook),
      ];
      if (hook.last_attempt_at) parts.push(timeEl(hook.last_attempt_at, "Last attempt"));
      return parts;
    }
    if (!hook.last_delivery_status) {
      return [el("span", { class: "status none", text: "None yet" })];
    }
    const parts = [
      el("span", {
        class: `status ${hook.last_delivery_status}`,
        text: STATUS_WORDS[hook.last_delivery_status] || hook.last_delivery_status,
      }),
    ];
    if (hook.last_delivery_status === "failed" && hook.last_error) {
      parts.push(el("span", { class: "reason", text: hook.last_error }));
    }
    parts.push(streakLine(hook));
    if (hook.last_delivery_at) parts.push(timeEl(hook.last_delivery_at));
    return parts;
  }

  function row(hook) {
    const toggle = el("input", {
      type: "checkbox",
      role: "switch",
      class: "switch",
      "aria-label": `Enabled: ${hook.name}`,
      data: { key: `enabled-${hook.id}` },
    });
    toggle.checked = hook.enabled;
    toggle.addEventListener("change", () => setEnabled(hook, toggle));

    const name = el(
      "div",
      { class: "name" },
      el("span", { class: "name-text", text: hook.name }),
      hook.enabled ? null : el("span", { class: "badge off", text: "Disabled" }),
    );
    const extras = extrasText(hook);
    const actions = el(
      "div",
      { class: "row-actions" },
      el("button", {
        type: "button",
        class: "small",
        text: "Edit",
        "aria-label": `Edit ${hook.name}`,
        data: { key: `edit-${hook.id}` },
        onclick: (event) => openForm(hook, event.currentTarget),
      }),
      el("button", {
        type: "button",
        class: "small",
        text: "Delivery log",
        "aria-label": `Delivery log of ${hook.name}`,
        data: { key: `log-${hook.id}` },
        onclick: (event) => openLog(hook, event.currentTarget),
      }),
      el("button", {
        type: "button",
        class: "small link-danger",
        text: "Delete",
        "aria-label": `Delete ${hook.name}`,
        data: { key: `delete-${hook.id}` },
        onclick: (event) => openDelete(hook, event.currentTarget),
      }),
    );
    return el(
      "tr",
      { class: hook.enabled ? "enabled" : "disabled", data: { id: hook.id } },
      el(
        "td",
        { class: "who" },
        name,
        urlText(hook.url),
        extras ? el("span", { class: "extras", text: extras }) : null,
      ),
      el(
        "td",
        { class: "event", "data-label": "Event" },
        displayName(hook.event),
        hook.format && hook.format !== "json"
          ? el("span", { class: "badge format", text: FORMAT_NAMES[hook.format] || hook.format })
          : null,
      ),
      el("td", { class: "enabled-cell", "data-label": "Enabled" }, toggle),
      el("td", { class: "last", "data-label": "Last delivery" }, ...statusCell(hook)),
      el("td", { class: "num pending", "data-label": "Pending", text: String(hook.pending) }),
      el("td", { class: "actions-cell" }, actions),
    );
  }

  // "Headers: Authorization · At most 5 requests a second": the names of the webhook's
  // own headers (their values are never shown) and its rate limit.
  function extrasText(hook) {
    const parts = [];
    const names = Object.keys(hook.headers || {});
    if (names.length) parts.push(`Headers: ${names.join(", ")}`);
    if (hook.rate_limit) {
      const requests = hook.rate_limit === 1 ? "request" : "requests";
      parts.push(`At most ${hook.rate_limit} ${requests} a second`);
    }
    return parts.join(" · ");
  }

  async function setEnabled(hook, toggle) {
    const wanted = toggle.checked;
    try {
      const saved = await call("PATCH", `/webhooks/${hook.id}`, { enabled: wanted });
      notice(`“${saved.name}” is ${saved.enabled ? "enabled" : "disabled"}.`);
    } catch (error) {
      toggle.checked = !wanted;
      if (error.status !== 401) banner(`“${hook.name}” could not be changed: ${error.message}`);
    }
    await loadList();
  }

  // ---------------------------------------------------------------- dialogs

  function openDialog(dialog, opener) {
    state.opener = opener || document.activeElement;
    dialog.showModal();
  }

  function onDialogClosed(dialog, cleanup) {
    dialog.addEventListener("close", () => {
      cleanup();
      const opener = state.opener;
      state.opener = null;
      if (opener && document.contains(opener)) opener.focus();
      else $("main").focus();
    });
    for (const button of dialog.querySelectorAll("[data-close]")) {
      button.addEventListener("click", () => dialog.close());
    }
  }

  // ---------------------------------------------------------------- add and edit

  const FIELDS = ["name", "url", "event", "format", "secret", "enabled", "headers", "rate_limit"];

  // What the page can tell before asking the server, per field, in the API's own words:
  // "" when fine. All are shown at once, and each goes away as its field is corrected.
  const CHECKS = {
    name: () => ($("f-name").value.trim() ? "" : "name must not be empty"),
    url: () => {
      const url = $("f-url").value.trim();
      if (!url) return "url is required";
      const https = /^https:\/\/[^/?#\s]+/i.test(url);
      return https ? "" : "url must be an absolute https:// URL with a host";
    },
    event: () => ($("f-event").value ? "" : "event is required: choose one"),
    secret: () => {
      const length = $("f-secret").value.length;
      return length && length < 16 ? "secret must be at least 16 characters" : "";
    },
  };

  const FORMAT_NAMES = { json: "JSON", slack: "Slack", discord: "Discord" };
  const FORMAT_HINTS = {
    json: "Your endpoint gets the event as JSON: its name, a timestamp and the event's data.",
    slack:
      "Your Slack channel gets a message about the event (who, what, when), " +
      "for a Slack incoming webhook URL.",
    discord:
      "Your Discord channel gets a message with a card about the event (who, what, when), " +
      "for a Discord webhook URL.",
  };

  // The format a URL calls for: the same rule as the database's outbox.format_for_url(),
  // which picks it for webhooks created without one.
  function formatForUrl(url) {
    if (/^https:\/\/([^/?#@]*@)?hooks\.slack\.com(:[0-9]+)?([/?#]|$)/i.test(url)) return "slack";
    const discord =
      /^https:\/\/([^/?#@]*@)?((ptb|canary)\.)?(discord|discordapp)\.com(:[0-9]+)?\/api\/(v[0-9]+\/)?webhooks\//i;
    return discord.test(url) ? "discord" : "json";
  }

  function showFormatHint() {
    $("f-format-hint").textContent = FORMAT_HINTS[$("f-format").value] || "";
  }

  // Until the user picks a format by hand, typing a Slack or Discord URL picks it.
  function followUrl() {
    if (state.formatPicked) return;
    $("f-format").value = formatForUrl($("f-url").value.trim());
    showFormatHint();
  }

  // Which field an API message is about: the API's messages start with the field's
  // name ("url must be an absolute https:// URL with a host"), or say "unknown event".
  function fieldOf(message) {
    const text = message.toLowerCase();
    if (text.startsWith("unknown event")) return "event";
    return FIELDS.find((field) => text.startsWith(field)) || null;
  }

  function clearErrors() {
    for (const field of FIELDS) {
      const error = $(`f-${field}-error`);
      error.textContent = "";
      show(error, false);
      $(`f-${field}`).removeAttribute("aria-invalid");
    }
    $("form-error").textContent = "";
    show($("form-error"), false);
  }

  function showError(message) {
    const field = fieldOf(message);
    if (field && !$(`f-${field}`).closest("[hidden]")) {
      fieldError(field, message);
      $(`f-${field}`).focus();
    } else {
      $("form-error").textContent = message;
      show($("form-error"), true);
    }
  }

  function fieldError(field, message) {
    const error = $(`f-${field}-error`);
    error.textContent = message;
    show(error, Boolean(message));
    if (message) $(`f-${field}`).setAttribute("aria-invalid", "true");
    else $(`f-${field}`).removeAttribute("aria-invalid");
  }

  // Every problem the page can see, each at its field; false when there are any.
  function checkForm() {
    const wrong = Object.keys(CHECKS).filter((field) => {
      const message = CHECKS[field]();
      fieldError(field, message);
      return Boolean(message);
    });
    if (!wrong.length) return true;
    $("form-error").textContent =
      wrong.length === 1 ? "Correct the field marked below." : `Correct the ${wrong.length} fields marked below.`;
    show($("form-error"), true);
    $(`f-${wrong[0]}`).focus();
    return false;
  }

  // A field that is changed loses its error, or gets the one it still has.
  function recheck(field) {
    if ($(`f-${field}-error`).hidden) return;
    fieldError(field, CHECKS[field] ? CHECKS[field]() : "");
    const left = FIELDS.some((f) => !$(`f-${f}-error`).hidden);
    if (!left) show($("form-error"), false);
  }

  function fillEventSelect(select, withPlaceholder) {
    const options = state.events.map((e) => el("option", { value: e.name, text: e.display_name }));
    if (withPlaceholder) options.unshift(el("option", { value: "", text: "Select an event" }));
    select.replaceChildren(...options);
  }

  // Empty the secret field: a generated secret is shown once, until the dialog closes.
  function clearSecret() {
    const secret = $("f-secret");
    secret.value = "";
    secret.type = "password";
    show($("f-secret-once"), false);
    show($("f-secret-rotation"), false);
    $("copy-secret").textContent = "Copy secret";
  }

  function resetSecret() {
    clearSecret();
    $("f-remove-secret").checked = false;
  }

  // ---------------------------------------------------------------- headers

  const HEADER_LIMIT = 10;

  // One row of the dialog's headers. A saved header shows its name and takes a new
  // value, but never shows the old one (values are kept like the secret); Remove marks
  // it to be removed on Save. A new header takes a name and a value.
  function headerRow(name) {
    const saved = name !== null;
    const item = el("li", { class: "header-row", data: saved ? { name } : null });
    const value = el("input", {
      type: "password",
      class: "header-value",
      autocomplete: "new-password",
      spellcheck: "false",
      "aria-label": saved ? `New value of ${name}` : "Header value",
      placeholder: saved ? "Leave blank to keep the value" : "Value",
    });
    const remove = el("button", {
      type: "button",
      class: "small",
      text: "Remove",
      "aria-label": saved ? `Remove ${name}` : "Remove this header",
    });
    if (saved) {
      item.append(el("span", { class: "header-name", text: name }), value, remove);
      remove.addEventListener("click", () => {
        const removed = !item.classList.contains("removed");
        item.classList.toggle("removed", removed);
        value.disabled = removed;
        remove.textContent = removed ? "Undo" : "Remove";
        remove.setAttribute("aria-label", `${removed ? "Keep" : "Remove"} ${name}`);
        updateAddHeader();
      });
    } else {
      const nameInput = el("input", {
        type: "text",
        class: "header-name-input",
        autocomplete: "off",
        spellcheck: "false",
        "aria-label": "Header name",
        placeholder: "Name, e.g. Authorization",
      });
      item.append(nameInput, value, remove);
      remove.addEventListener("click", () => {
        item.remove();
        updateAddHeader();
        $("add-header").focus();
      });
    }
    return item;
  }

  function updateAddHeader() {
    const kept = [...$("header-rows").children].filter((r) => !r.classList.contains("removed"));
    $("add-header").disabled = kept.length >= HEADER_LIMIT;
  }

  function addHeader() {
    const item = headerRow(null);
    $("header-rows").append(item);
    updateAddHeader();
    item.querySelector("input").focus();
  }

  function fillHeaders(hook) {
    const names = hook ? Object.keys(hook.headers || {}) : [];
    $("header-rows").replaceChildren(...names.map(headerRow));
    updateAddHeader();
  }

  // The headers to send: a new webhook's, or for a change only what changed (a new
  // value, null for one removed, a new header): values are never sent back. Null when
  // nothing changed.
  function headerFields() {
    const headers = {};
    for (const item of $("header-rows").children) {
      const value = item.querySelector(".header-value").value;
      if (item.dataset.name !== undefined) {
        if (item.classList.contains("removed")) headers[item.dataset.name] = null;
        else if (value) headers[item.dataset.name] = value;
      } else {
        const name = item.querySelector(".header-name-input").value.trim();
        if (name || value) headers[name] = value;
      }
    }
    return Object.keys(headers).length ? headers : null;
  }

  function openForm(hook, opener) {
    state.editing = hook || null;
    const editing = Boolean(hook);
    clearErrors();
    resetSecret();
    $("webhook-dialog-title").textContent = editing ? "Edit Webhook" : "Add Webhook";
    $("submit-webhook").textContent = editing ? "Save" : "Create";
    $("f-name").value = editing ? hook.name : "";
    $("f-url").value = editing ? hook.url : "";
    fillEventSelect($("f-event"), !editing);
    $("f-event").value = editing ? hook.event : "";
    $("f-format").value = editing ? hook.format : "json";
    // A format that is not the one its URL calls for was picked by hand: keep it.
    state.formatPicked = editing && hook.format !== formatForUrl(hook.url);
    showFormatHint();
    $("f-secret").placeholder =
      editing && hook.has_secret ? "Leave blank to keep the current secret" : "";
    $("f-secret-hint").textContent =
      editing && hook.has_secret
        ? "A signing secret is set. Enter a new one (at least 16 characters) to replace it."
        : "At least 16 characters. Every delivery is signed with it (X-Webhook-Signature), " +
          "so your endpoint can verify where it came from.";
    $("sample").open = false;
    show($("remove-secret-label"), editing && hook.has_secret);
    show($("enabled-field"), editing);
    $("f-enabled").checked = editing ? hook.enabled : true;
    fillHeaders(hook);
    $("f-rate_limit").value = editing && hook.rate_limit !== null ? String(hook.rate_limit) : "";
    show($("test-section"), editing);
    if (editing) {
      fillEventSelect($("t-event"), false);
      $("t-event").value = hook.event;
      $("test-result").replaceChildren();
      $("test-result").className = "test-result";
    }
    showSample();
    openDialog($("webhook-dialog"), opener);
    $("f-name").focus();
  }

  function formFields() {
    const hook = state.editing;
    const fields = {};
    const name = $("f-name").value;
    const url = $("f-url").value.trim();
    const event = $("f-event").value;
    const secret = $("f-secret").value;
    if (!hook || name !== hook.name) fields.name = name;
    if (!hook || url !== hook.url) fields.url = url;
    if (event && (!hook || event !== hook.event)) fields.event = event;
    const format = $("f-format").value;
    if (!hook || format !== hook.format) fields.format = format;
    if (hook && $("f-remove-secret").checked && !secret) fields.secret = null;
    else if (secret) fields.secret = secret;
    if (hook && $("f-enabled").checked !== hook.enabled) fields.enabled = $("f-enabled").checked;
    const headers = headerFields();
    if (headers) fields.headers = headers;
    const rate = $("f-rate_limit");
    if (rate.validity.badInput) {
      // Not a number at all: the API says what it takes.
      fields.rate_limit = "";
    } else {
      const limit = rate.value.trim() === "" ? null : Number(rate.value);
      if (hook ? limit !== hook.rate_limit : limit !== null) fields.rate_limit = limit;
    }
    return fields;
  }

  async function submitForm(event) {
    event.preventDefault();
    clearErrors();
    if (!checkForm()) return;
    const hook = state.editing;
    const button = $("submit-webhook");
    button.disabled = true;
    try {
      const saved = hook
        ? await call("PATCH", `/webhooks/${hook.id}`, formFields())
        : await call("POST", "/webhooks", formFields());
      resetSecret();
      $("webhook-dialog").close();
      notice(hook ? `Changes to “${saved.name}” were saved.` : `“${saved.name}” was created.`);
      await loadList();
    } catch (error) {
      if (error.status !== 401) showError(error.message);
    } finally {
      button.disabled = false;
    }
  }

  // What a delivery of the chosen event looks like to the endpoint, as the form stands.
  function showSample() {
    const found = state.events.find((e) => e.name === $("f-event").value);
    const intro = $("sample-intro");
    if (!found) {
      intro.textContent = "Choose an event to see a sample delivery of it.";
      $("sample-request").textContent = "";
      show($("sample-request"), false);
      return;
    }
    const hook = state.editing;
    const signed =
      Boolean($("f-secret").value) ||
      Boolean(hook && hook.has_secret && !$("f-remove-secret").checked);
    const example = found.example;
    const headers = Object.entries(example.headers).filter(
      ([name]) => signed || !/^(x-webhook-signature|webhook-)/i.test(name),
    );
    const url = /^https:\/\/[^/?#\s]+/i.test($("f-url").value.trim())
      ? $("f-url").value.trim()
      : "https://your-endpoint.example.com/webhooks";
    const lines = [`POST ${url}`, ...headers.map(([name, value]) => `${name}: ${value}`)];
    $("sample-request").textContent = `${lines.join("\n")}\n\n${example.body}`;
    show($("sample-request"), true);
    const words = [`A delivery of ${found.display_name}, as your endpoint receives it.`];
    if (signed) {
      words.push(
        `These signatures are made with the example secret ${example.secret}, so you can ` +
          "try your verification on them; your deliveries are signed with your own secret.",
      );
    } else {
      words.push("Without a signing secret, deliveries carry no signature to verify.");
    }
    if ($("f-format").value !== "json") {
      words.push(
        `With the ${FORMAT_NAMES[$("f-format").value]} format the body is a chat message ` +
          "about the event instead; the headers are the same.",
      );
    }
    intro.textContent = words.join(" ");
  }

  // Replacing a secret keeps the old one signing for a while: say so as it is typed.
  function showRotation() {
    const hook = state.editing;
    show($("f-secret-rotation"), Boolean(hook && hook.has_secret && $("f-secret").value));
  }

  function generateSecret() {
    const bytes = new Uint8Array(32);
    crypto.getRandomValues(bytes);
    let binary = "";
    for (const byte of bytes) binary += String.fromCharCode(byte);
    // Standard base64 with padding, as Standard Webhooks libraries decode it.
    const encoded = btoa(binary);
    const secret = $("f-secret");
    secret.value = `whsec_${encoded}`;
    secret.type = "text";
    $("f-remove-secret").checked = false;
    $("copy-secret").textContent = "Copy secret";
    show($("f-secret-once"), true);
    showRotation();
    secret.focus();
    secret.select();
  }

  async function copySecret() {
    const secret = $("f-secret");
    try {
      await navigator.clipboard.writeText(secret.value);
      $("copy-secret").textContent = "Copied";
    } catch {
      secret.focus();
      secret.select();
      $("copy-secret").textContent = "Press Ctrl+C (⌘C) to copy";
    }
  }

  async function sendTest() {
    const hook = state.editing;
    const result = $("test-result");
    const button = $("send-test");
    button.disabled = true;
    result.className = "test-result";
    result.replaceChildren(el("p", { text: "Sending a test payload…" }));
    try {
      const outcome = await call("POST", `/webhooks/${hook.id}/test`, {
        event: $("t-event").value,
      });
      const details = [
        el("dt", { text: "Status code" }),
        el("dd", { text: outcome.status === null ? "no response" : String(outcome.status) }),
        el("dt", { text: "Duration" }),
        el("dd", { text: `${outcome.duration_ms} ms` }),
      ];
      if (!outcome.ok && outcome.error) {
        details.push(el("dt", { text: "Error" }), el("dd", { text: outcome.error }));
      }
      result.className = `test-result ${outcome.ok ? "succeeded" : "failed"}`;
      result.replaceChildren(
        el("strong", {
          class: `status ${outcome.ok ? "succeeded" : "failed"}`,
          text: outcome.ok ? "Succeeded" : "Failed",
        }),
        el("dl", {}, ...details),
      );
      result.scrollIntoView({ block: "nearest" });
    } catch (error) {
      result.className = "test-result failed";
      result.replaceChildren(el("p", { text: `The test payload was not sent: ${error.message}` }));
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- delete

  function openDelete(hook, opener) {
    state.deleting = hook;
    $("delete-name").textContent = hook.name;
    $("delete-error").textContent = "";
    show($("delete-error"), false);
    openDialog($("delete-dialog"), opener);
    $("cancel-delete").focus();
  }

  async function confirmDelete() {
    const hook = state.deleting;
    const button = $("confirm-delete");
    button.disabled = true;
    try {
      await call("DELETE", `/webhooks/${hook.id}`);
      $("delete-dialog").close();
      notice(`“${hook.name}” was deleted.`);
      await loadList();
    } catch (error) {
      if (error.status === 404) {
        $("delete-dialog").close();
        await loadList();
      } else if (error.status !== 401) {
        $("delete-error").textContent = error.message;
        show($("delete-error"), true);
      }
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- delivery log

  function openLog(hook, opener) {
    state.log = { hook, deliveries: [], cursor: null, signature: "" };
    $("log-name").textContent = hook.name;
    $("log-url").textContent = hook.url;
    $("log-notice").textContent = "";
    show($("log-error"), false);
    $("log-list").replaceChildren();
    show($("log-empty"), false);
    show($("log-more"), false);
    $("log-status").value = "";
    $("recover-since").value = localInput(new Date(Date.now() - 86400 * 1000));
    openDialog($("log-dialog"), opener);
    loadLog("first");
  }

  // Send again everything of this webhook that failed since the time picked (the API's
  // recover); says how many were queued, or the API's message (e.g. its 429).
  async function recover(event) {
    event.preventDefault();
    const hook = state.log.hook;
    const since = new Date($("recover-since").value);
    if (!hook || Number.isNaN(since.getTime())) {
      $("log-error").textContent = "Pick the date and time to send again from.";
      show($("log-error"), true);
      return;
    }
    const button = $("recover");
    button.disabled = true;
    try {
      const result = await call("POST", `/webhooks/${hook.id}/recover`, {
        since: since.toISOString(),
      });
      const n = result.requeued;
      $("log-notice").textContent =
        n === 0
          ? `Nothing failed since ${absolute.format(since)}.`
          : `${n} ${n === 1 ? "delivery was" : "deliveries were"} queued to be sent again.`;
      show($("log-error"), false);
    } catch (error) {
      if (error.status !== 401) {
        $("log-error").textContent = error.message;
        show($("log-error"), true);
      }
      return;
    } finally {
      button.disabled = false;
    }
    await loadLog("first");
    await loadList();
  }

  // "first": the newest page; "again": the pages shown so far, fresh; "older": one more.
  async function loadLog(which) {
    const log = state.log;
    const hook = log.hook;
    if (!hook || state.ended) return;
    let path = `/webhooks/${hook.id}/deliveries?limit=`;
    if (which === "older") path += `20&cursor=${encodeURIComponent(log.cursor)}`;
    else if (which === "again") path += String(Math.min(100, Math.max(20, log.deliveries.length)));
    else path += "20";
    const status = $("log-status").value;
    if (status) path += `&status=${encodeURIComponent(status)}`;
    let page;
    try {
      page = await call("GET", path);
    } catch (error) {
      if (error.status !== 401) {
        $("log-error").textContent = `The delivery log could not be loaded: ${error.message}`;
        show($("log-error"), true);
      }
      return;
    }
    if (state.log !== log) return; // another webhook's log was opened meanwhile
    show($("log-error"), false);
    log.deliveries = which === "older" ? log.deliveries.concat(page.deliveries) : page.deliveries;
    if (which !== "again" || log.deliveries.length < 100) log.cursor = page.next_cursor;
    renderLog();
  }

  function renderLog() {
    const log = state.log;
    const signature =
      JSON.stringify(log.deliveries) + log.deliveries.map((d) => ago(d.created_at)).join();
    show($("log-more"), Boolean(log.cursor));
    show($("log-empty"), log.deliveries.length === 0);
    if (signature === log.signature) return;
    log.signature = signature;
    // A request someone unfolded stays unfolded when the log is refreshed.
    const list = $("log-list");
    const unfolded = [...list.querySelectorAll("details[open]")].map((d) => d.dataset.key);
    replaceKeepingFocus(list, log.deliveries.map(deliveryItem));
    for (const key of unfolded) {
      const again = list.querySelector(`details[data-key="${CSS.escape(key)}"]`);
      if (again) again.open = true;
    }
  }

  function deliveryItem(delivery) {
    const head = el(
      "div",
      { class: "delivery-head" },
      el("span", {
        class: `status ${delivery.status}`,
        text: STATUS_WORDS[delivery.status] || delivery.status,
      }),
      el("span", { class: "event", text: displayName(delivery.event) }),
      el("span", { class: "delivery-id", text: `ID ${delivery.id}` }),
      el("span", { class: "grow" }),
      timeEl(delivery.created_at, "Created"),
    );
    if (delivery.status === "failed") {
      head.append(
        el("button", {
          type: "button",
          class: "small",
          text: "Retry",
          "aria-label": `Retry delivery ${delivery.id}`,
          data: { key: `retry-${delivery.id}` },
          onclick: (event) => retry(delivery, event.currentTarget),
        }),
      );
    }
    const parts = [head];
    if (delivery.status === "pending" && delivery.next_attempt_at) {
      parts.push(timeEl(delivery.next_attempt_at, "Next attempt"));
    }
    if (delivery.last_error && delivery.status !== "succeeded") {
      parts.push(el("span", { class: "reason", text: delivery.last_error }));
    }
    if (delivery.attempt_log.length) {
      parts.push(
        attemptsTable(delivery),
        el(
          "div",
          { class: "exchanges" },
          ...delivery.attempt_log.map((attempt) => exchange(delivery, attempt)),
        ),
      );
    }
    return el("li", { class: `delivery ${delivery.status}`, data: { id: delivery.id } }, ...parts);
  }

  function headerLines(headers) {
    return Object.entries(headers)
      .map(([name, value]) => `${name}: ${value}`)
      .join("\n");
  }

  // The request an attempt sent and the answer it got, folded away under its row.
  function exchange(delivery, attempt) {
    const request = attempt.request;
    const response =
      attempt.response_status === null
        ? [el("p", { class: "no-answer", text: `No answer: ${attempt.error || "no response"}` })]
        : [
            el("p", { class: "response-line", text: `HTTP ${attempt.response_status}` }),
            el("pre", {
              class: "response-body",
              text: attempt.response_body === "" ? "(empty body)" : attempt.response_body,
            }),
          ];
    return el(
      "details",
      { class: "exchange", data: { key: `exchange-${delivery.id}-${attempt.attempt}` } },
      el("summary", { text: `Request and response of attempt ${attempt.attempt}` }),
      el(
        "div",
        { class: "exchange-parts" },
        el(
          "section",
          { class: "request", "aria-label": `Request of attempt ${attempt.attempt}` },
          el("h4", { text: "Request" }),
          el("p", { class: "request-line", text: `${request.method} ${request.url}` }),
          el("pre", { class: "request-headers", text: headerLines(request.headers) }),
          el("pre", { class: "request-body", text: delivery.request_body }),
        ),
        el(
          "section",
          { class: "response", "aria-label": `Response to attempt ${attempt.attempt}` },
          el("h4", { text: "Response" }),
          ...response,
          el("p", { class: "duration", text: `${attempt.duration_ms} ms` }),
        ),
      ),
    );
  }

  function attemptsTable(delivery) {
    const rows = delivery.attempt_log.map((attempt) =>
      el(
        "tr",
        {},
        el("td", { text: String(attempt.attempt) }),
        el("td", {}, timeEl(attempt.started_at)),
        el("td", {
          class: "code",
          text: attempt.response_status === null ? "—" : String(attempt.response_status),
        }),
        el("td", { class: "num", text: `${attempt.duration_ms} ms` }),
        el("td", { class: "error", text: attempt.error || "" }),
        el("td", { class: "answer", text: attempt.response_body || "" }),
      ),
    );
    return el(
      "table",
      { class: "attempts", "aria-label": `Attempts of delivery ${delivery.id}` },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", { scope: "col", text: "Attempt" }),
          el("th", { scope: "col", text: "Sent" }),
          el("th", { scope: "col", text: "Status code" }),
          el("th", { scope: "col", class: "num", text: "Duration" }),
          el("th", { scope: "col", text: "Error" }),
          el("th", { scope: "col", text: "Answer" }),
        ),
      ),
      el("tbody", {}, ...rows),
    );
  }

  async function retry(delivery, button) {
    button.disabled = true;
    try {
      await call("POST", `/deliveries/${delivery.id}/retry`);
      $("log-notice").textContent = `Delivery ${delivery.id} was queued to be sent again.`;
    } catch (error) {
      button.disabled = false;
      if (error.status !== 401) {
        $("log-error").textContent = error.message;
        show($("log-error"), true);
      }
      return;
    }
    await loadLog("again");
    await loadList();
  }

  // ---------------------------------------------------------------- start

  function poll() {
    if (state.ended) return;
    if (!document.hidden) {
      loadList();
      if ($("log-dialog").open) loadLog("again");
    }
  }

  async function start() {
    $("add-webhook").addEventListener("click", (event) => openForm(null, event.currentTarget));
    $("refresh").addEventListener("click", async () => {
      state.listSignature = "";
      await loadList();
    });
    $("webhook-form").addEventListener("submit", submitForm);
    $("f-url").addEventListener("input", followUrl);
    for (const field of FIELDS) {
      const input = $(`f-${field}`);
      input.addEventListener("input", () => recheck(field));
      input.addEventListener("change", () => recheck(field));
    }
    for (const id of ["f-event", "f-format", "f-secret", "f-url", "f-remove-secret"]) {
      $(id).addEventListener("input", showSample);
      $(id).addEventListener("change", showSample);
    }
    if (sessionToken) {
      $("signout").elements.session.value = sessionToken;
      // The sign-in's POST answered this page: a reload must not post the link again.
      if (location.pathname.includes("/portal/")) history.replaceState(null, "", "../settings/webhooks");
    }
    $("f-format").addEventListener("change", () => {
      state.formatPicked = true;
      showFormatHint();
    });
    $("generate-secret").addEventListener("click", generateSecret);
    $("add-header").addEventListener("click", addHeader);
    $("f-secret").addEventListener("input", showRotation);
    $("copy-secret").addEventListener("click", copySecret);
    $("f-remove-secret").addEventListener("change", () => {
      if ($("f-remove-secret").checked) clearSecret();
    });
    $("send-test").addEventListener("click", sendTest);
    $("confirm-delete").addEventListener("click", confirmDelete);
    $("log-more").addEventListener("click", () => loadLog("older"));
    $("log-refresh").addEventListener("click", () => loadLog("again"));
    $("log-status").addEventListener("change", () => loadLog("first"));
    $("recover-form").addEventListener("submit", recover);
    onDialogClosed($("webhook-dialog"), () => {
      resetSecret();
      // Header values typed in are not kept once the dialog is closed.
      $("header-rows").replaceChildren();
      state.editing = null;
    });
    onDialogClosed($("delete-dialog"), () => {
      state.deleting = null;
    });
    onDialogClosed($("log-dialog"), () => {
      state.log = { hook: null, deliveries: [], cursor: null, signature: "" };
    });

    try {
      state.events = (await call("GET", "/events")).events;
    } catch (error) {
      if (error.status !== 401) banner(`The page could not be loaded: ${error.message}`);
      return;
    }
    await loadList();
    setInterval(poll, LIST_POLL_MS);
    setInterval(() => {
      if (
        !document.hidden &&
        $("log-dialog").open &&
        state.log.deliveries.some((d) => d.status === "pending")
      ) {
        loadLog("again");
      }
    }, LOG_POLL_MS);
  }

  start();
})();
