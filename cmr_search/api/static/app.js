// cmr-search page: text search, neighbours, upload; cines are fetched with the API key and
// shown as blob URLs (an <img src> cannot send an Authorization header).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("cmr-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("cmr-api-key", keyInput.value.trim()));

function status(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.style.color = isError ? "var(--accent)" : "";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const key = keyInput.value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

const getJSON = async (path, options) => (await api(path, options)).json();

function filters() {
  const f = {};
  const view = $("#f-view").value, sex = $("#f-sex").value;
  const ageMin = $("#f-age-min").value, ageMax = $("#f-age-max").value;
  if (view) f.view = view;
  if (sex) f.sex = sex;
  if (ageMin) f.age_min = Number(ageMin);
  if (ageMax) f.age_max = Number(ageMax);
  return f;
}

// one clip of each view the study has: the long-axis views, then the mid short-axis slice
function pickViews(views) {
  const chosen = [];
  for (const name of ["4CH", "2CH", "3CH", "LVOT", "OTHER"]) {
    const v = views.find((x) => x.view === name);
    if (v) chosen.push(v);
  }
  const sax = views.filter((x) => x.view === "SAX").sort((a, b) => (a.slice_index ?? 0) - (b.slice_index ?? 0));
  if (sax.length) chosen.push(sax[Math.floor(sax.length / 2)]);
  return chosen;
}

// the study in the archive's own viewer, when the service has a viewer_url template; a new
// tab without a window.opener, so the viewer's page cannot steer this one
function setViewer(card, url) {
  const link = $(".viewer", card);
  if (!url || !/^https?:\/\//i.test(url)) return;
  link.href = url;
  link.title = "open this study in the archive's viewer (new tab)";
  link.hidden = false;
}

async function showCines(card, studyUrl) {
  const study = await getJSON(studyUrl);
  setViewer(card, study.viewer_url);  // the study view (a neighbour query's card) gets it from here
  const box = $(".cines", card);
  for (const view of pickViews(study.views)) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = view.view + (view.slice_index != null && view.view === "SAX" ? " slice " + view.slice_index : "");
    const cap = document.createElement("figcaption");
    cap.textContent = img.alt;
    fig.append(img, cap);
    box.append(fig);
    api(view.cine).then((r) => r.blob()).then((blob) => {
      img.onload = () => { img.dataset.loaded = "1"; };
      img.src = URL.createObjectURL(blob);
    }).catch((e) => { cap.textContent = view.view + ": " + e.message; });
  }
}

function renderPredictions(card, predictions) {
  const box = $(".predictions", card);
  box.textContent = "";
  for (const p of predictions) {
    for (const [label, value] of Object.entries(p.prediction)) {
      const div = document.createElement("div");
      div.className = "prediction";
      const positive = p.positive && p.positive[label];
      const shown = p.task === "regression" ? value.toFixed(1) : (100 * value).toFixed(0) + "%";
      div.innerHTML = `<span class="${positive ? "positive" : ""}"></span>`;
      div.firstChild.textContent = `${label}: ${shown}` + (positive ? " (positive)" : "");
      if (p.attention && p.attention.length) {
        const bars = document.createElement("div");
        bars.className = "attention";
        bars.title = p.attention_source === "encoder_pooling"
          ? "weight of each view in the study embedding this head reads"
          : "attention of the head on each view";
        const top = Math.max(...p.attention.map((a) => a.weight));
        for (const a of p.attention) {
          const bar = document.createElement("span");
          bar.style.height = (100 * a.weight / top).toFixed(0) + "%";
          bar.title = `${a.view}${a.view === "SAX" ? " " + a.slice_index : ""}: ${(100 * a.weight).toFixed(0)}%`;
          bars.append(bar);
        }
        div.append(bars);
      }
      box.append(div);
    }
  }
}

// a text hit's verdict per finding of the query: what its report (or, without one, a head) says
const VERDICTS = {
  match: ["✓", "the study's report (or a head) states it as asked"],
  contradicts: ["✗", "it states the opposite of what was asked"],
  grade_differs: ["≈", "it states the finding at another grade"],
  conflicting: ["!", "the report states it both ways"],
  not_stated: ["–", "the report does not mention it"],
  unknown: ["?", "the study has no report and no head predicts this finding"],
};

const quoted = (phrases) => phrases.map((p) => `‘${p}’`).join(", ");

function stated(e) {
  if (e.source === "report") return e.evidence.length ? quoted(e.evidence) : e.stated;
  const number = e.probability != null ? (100 * e.probability).toFixed(0) + "%"
    : e.value != null ? `${e.label} ${e.value.toFixed(1)}` : "";
  return `${e.stated} (${number})`;
}

function verdictText(e) {
  switch (e.verdict) {
    case "match": return `${e.asked} — ${e.source}: ${stated(e)}`;
    case "contradicts": return `${e.asked} — contradicts: ${e.source} says ${stated(e)}`;
    case "grade_differs": return `${e.asked} — grade differs: ${e.source} says ${e.stated_grade}, ${stated(e)}`;
    case "conflicting": return `${e.asked} — report says both: ${quoted(e.evidence)} and ${quoted(e.opposite)}`;
    case "not_stated": return `${e.asked} — not stated in the report`;
    default: return `${e.asked} — unknown: no report, no head predicts it`;
  }
}

function renderWhy(card, explanation) {
  const box = $(".why", card);
  box.textContent = "";
  for (const e of explanation) {
    const [mark, meaning] = VERDICTS[e.verdict] || ["?", e.verdict];
    const line = document.createElement("div");
    line.className = "verdict " + e.verdict;
    line.dataset.finding = e.finding;
    line.dataset.verdict = e.verdict;
    line.title = meaning;
    const m = document.createElement("span");
    m.className = "mark";
    m.textContent = mark;
    const text = document.createElement("span");
    text.textContent = verdictText(e);
    line.append(m, text);
    box.append(line);
  }
}

function card(hit, isQuery = false) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  if (isQuery) node.classList.add("query");
  node.dataset.studyUid = hit.study_uid;
  const uid = $(".uid", node);
  uid.textContent = hit.study_uid;
  uid.title = hit.study_uid;
  uid.href = "#";
  uid.onclick = (e) => { e.preventDefault(); neighbors(hit.study_uid); };
  $(".score", node).textContent = hit.score == null ? "query" : hit.score.toFixed(3);
  const meta = [hit.sex, hit.age != null ? Math.round(hit.age) + " y" : null, hit.vendor, hit.site,
                (hit.views_present || []).join(" ")].filter(Boolean);
  $(".meta", node).textContent = meta.join(" · ");
  setViewer(node, hit.viewer_url);
  $(".neighbors", node).onclick = () => neighbors(hit.study_uid);
  return node;
}

function fill(node, hit) {
  if (hit.links && hit.links.study) {
    showCines(node, hit.links.study).catch((e) => status(e.message, true));
    getJSON(hit.links.predictions).then((r) => renderPredictions(node, r.predictions)).catch(() => {});
  }
}

function render(title, hits, query, findings) {
  $("#results-title").textContent = title;
  // what the search read from the query: the findings each hit is checked against
  $("#understood").textContent = !findings ? ""
    : findings.length ? "Findings of the query, checked against each study's report (or its heads): " + findings.map((f) => f.asked).join(" · ")
    : "No findings recognised in the query: studies are ranked by similarity alone.";
  const grid = $("#results");
  grid.textContent = "";
  if (query) {
    const q = card(query, true);
    grid.append(q);
    if (query.predictions) renderPredictions(q, query.predictions); else fill(q, query);
  }
  for (const hit of hits) {
    const node = card(hit);
    grid.append(node);
    if (hit.explanation) renderWhy(node, hit.explanation);
    fill(node, hit);
  }
  status(hits.length ? "" : "no studies matched");
}

async function search(event) {
  event.preventDefault();
  status("searching...");
  try {
    const body = { query: $("#query").value, k: Number($("#k").value) || 8, filters: filters() };
    const result = await getJSON("/search/text", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    render(`${result.hits.length} studies for “${result.query}”`, result.hits, null, result.findings);
  } catch (e) { status(e.message, true); }
}

async function neighbors(studyUid) {
  status("finding neighbours...");
  try {
    const k = Number($("#k").value) || 8;
    const f = JSON.stringify(filters());
    const result = await getJSON(`/studies/${encodeURIComponent(studyUid)}/neighbors?k=${k}&filters=${encodeURIComponent(f)}`);
    const query = { study_uid: studyUid, score: null, links: {
      study: `/studies/${encodeURIComponent(studyUid)}`, predictions: `/studies/${encodeURIComponent(studyUid)}/predictions` } };
    render(`${result.hits.length} nearest studies to ${studyUid}`, result.hits, query);
  } catch (e) { status(e.message, true); }
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const persist = $("#persist").checked;
  status(`uploading ${files.length} file(s)...`);
  try {
    const r = await getJSON(`/studies?persist=${persist}`, { method: "POST", body: form });
    const query = { study_uid: r.study_uid, score: null, views_present: r.views_present, predictions: r.predictions,
                    links: persist ? { study: `/studies/${encodeURIComponent(r.study_uid)}` } : {} };
    render(`${r.neighbors.length} nearest studies to the uploaded study` + (persist ? " (stored)" : " (not stored)"),
           r.neighbors, query);
    if (persist) showCines($("#results .card.query"), query.links.study).catch(() => {});
  } catch (e) { status(e.message, true); }
}

$("#search-form").addEventListener("submit", search);
const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload([...e.dataTransfer.files]); });
drop.addEventListener("click", (e) => { if (e.target === drop) $("#file-input").click(); });
$("#file-input").addEventListener("change", (e) => upload([...e.target.files]));
fetch("/readyz").then((r) => r.json()).then((r) => { if (r.model_id) $("#model").textContent = "model " + r.model_id; })
  .catch(() => {});
