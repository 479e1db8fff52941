// The labelling page: fetch the next item, send one judgement per click or key, undo.
// Plain JS served by the app (no build). Texts (guidelines included) are inserted with
// textContent, never as HTML.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token") || sessionStorage.getItem("label-token") || "";
if (token) sessionStorage.setItem("label-token", token);

const $ = (id) => document.getElementById(id);
const state = { annotator: "", item: null, ranking: [], busy: false };

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").className = kind || "";
}

async function api(path, body) {
  const options = { headers: { "X-Label-Token": token } };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const text = await response.text();
  let data;
  try { data = JSON.parse(text); } catch (e) { data = { error: text.trim() || response.statusText }; }
  data.status = response.status;
  return data;
}

function showProgress(data) {
  const total = Math.max(data.total || 0, 0);
  $("progress-text").textContent = `${data.done} / ${total}`;
  $("progress-fill").style.width = total ? `${(100 * data.done) / total}%` : "0";
}

function render(data) {
  showProgress(data);
  state.item = data.item;
  state.ranking = [];
  document.body.dataset.itemId = data.item ? data.item.id : "";
  if (!data.item) {
    $("task").hidden = true;
    if (data.generation_error) {
      setStatus(data.generation_error, "error");
    } else if (data.generating) {
      setStatus(`Sampling more candidates… (${data.done} labelled so far)`);
      setTimeout(loadNext, 1000);
      return;
    }
    $("done").hidden = data.generating || data.total === 0;
    return;
  }
  $("done").hidden = true;
  $("task").hidden = false;
  $("prompt").textContent = data.item.prompt;
  const k = data.item.responses.length;
  $("instructions").textContent = k === 2
    ? "Click the better response, or press 1 or 2."
    : `Click the responses from best to worst, or press their numbers 1–${k} in that order.`;
  $("clear").hidden = k === 2;
  const list = $("responses");
  list.replaceChildren();
  data.item.responses.forEach((text, position) => {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "response";
    card.id = `response-${position + 1}`;
    const head = document.createElement("span");
    head.className = "head";
    const label = document.createElement("span");
    label.textContent = `Response ${position + 1}`;
    const key = document.createElement("kbd");
    key.textContent = String(position + 1);
    label.append(" ", key);
    const rank = document.createElement("span");
    rank.className = "rank";
    head.append(label, rank);
    const body = document.createElement("pre");
    body.textContent = text;
    card.append(head, body);
    card.addEventListener("click", () => choose(position));
    list.append(card);
  });
}

function showRanking() {
  document.querySelectorAll(".response").forEach((card, position) => {
    const rank = state.ranking.indexOf(position);
    card.classList.toggle("ranked", rank >= 0);
    card.querySelector(".rank").textContent = rank >= 0 ? `#${rank + 1}` : "";
  });
}

// After a judgement or an undo the pressed button must not keep the focus: a stray Enter would
// press it again, on an item not seen yet. The item's container takes the focus instead.
function focusItem() {
  const active = document.activeElement;
  if (active && active.closest("input, textarea")) return;  // never interrupt typing
  if (!$("task").hidden) $("task").focus({ preventScroll: true });
  else if (active && active.closest("button")) active.blur();
}

async function loadNext() {
  if (!state.annotator) return;
  const data = await api(`api/next?annotator=${encodeURIComponent(state.annotator)}`);
  if (data.error && data.status !== 200) { setStatus(data.error, "error"); return; }
  render(data);
  focusItem();
}

async function loadGuidelines() {
  const data = await api("api/info");
  if (data.status !== 200 || !data.guidelines) return;  // a wrong token shows on the first item
  $("guidelines-text").textContent = data.guidelines;
  $("guidelines").hidden = false;
}

async function submit(choice, order) {
  if (!state.item || state.busy) return;
  state.busy = true;
  try {
    const data = await api("api/judge", {
      annotator: state.annotator, item: state.item.id, shown: state.item.shown,
      choice, order, comment: $("comment").value,
    });
    if (data.status === 200 || data.status === 409) {
      $("comment").value = "";
      setStatus(data.status === 200 ? `Saved (${choice === "ranked" ? "preference" : choice}).` : "Already labelled; moved on.", "ok");
      await loadNext();
    } else {
      setStatus(`Not saved: ${data.error}`, "error");
    }
  } catch (err) {
    setStatus(`Not saved (server unreachable): ${err}`, "error");
  } finally {
    state.busy = false;
  }
}

function choose(position) {
  if (!state.item || state.busy) return;
  const k = state.item.responses.length;
  if (position >= k) return;
  if (k === 2) { submit("ranked", [position, 1 - position]); return; }
  if (!state.ranking.includes(position)) state.ranking.push(position);
  if (state.ranking.length === k - 1) {
    for (let p = 0; p < k; p++) if (!state.ranking.includes(p)) state.ranking.push(p);
  }
  showRanking();
  if (state.ranking.length === k) submit("ranked", state.ranking.slice());
}

async function undo() {
  if (state.busy || !state.annotator) return;
  state.busy = true;
  try {
    const data = await api("api/undo", { annotator: state.annotator });
    if (data.status !== 200) { setStatus(`Undo failed: ${data.error}`, "error"); return; }
    setStatus(data.undone ? "Undid your last label." : "Nothing to undo.", "ok");
  } finally {
    state.busy = false;
  }
  await loadNext();
}

function start() {
  const name = $("annotator").value.trim();
  if (!name) { setStatus("Enter your name first.", "error"); $("annotator").focus(); return; }
  state.annotator = name;
  localStorage.setItem("label-annotator", name);
  setStatus("");
  $("start").textContent = "Switch";
  $("annotator").blur();
  loadNext();
}

$("start").addEventListener("click", start);
$("annotator").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
$("tie").addEventListener("click", () => submit("tie", null));
$("skip").addEventListener("click", () => submit("skip", null));
$("undo").addEventListener("click", undo);
$("done-undo").addEventListener("click", undo);  // the "all labelled" screen keeps its Undo
$("clear").addEventListener("click", () => { state.ranking = []; showRanking(); });

document.addEventListener("keydown", (e) => {
  const typing = e.target.closest && e.target.closest("input, textarea");
  if (typing || e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  if (e.key >= "1" && e.key <= "9") choose(Number(e.key) - 1);
  else if (e.key === "t") submit("tie", null);
  else if (e.key === "s") submit("skip", null);
  else if (e.key === "u") undo();
  else if (e.key === "Escape") { state.ranking = []; showRanking(); }
  else return;
  e.preventDefault();
});

loadGuidelines();
$("annotator").value = params.get("annotator") || localStorage.getItem("label-annotator") || "";
if ($("annotator").value) start(); else $("annotator").focus();
