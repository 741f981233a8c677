// The masm detection page: sends a dropped or chosen file to /v1/detect and shows the answer.
// Server strings go into the page as text only (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let threshold = 0.5;
let previewUrl = null;

function headers() {
  const key = $("key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function describeModel() {
  try {
    const response = await fetch("/v1/model", { headers: headers() });
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    // the plot marks the video-level decision threshold (the frame scores' mean is what it judges)
    const point = info.operating_point.video;
    threshold = point.threshold;
    const crops = info.faces ? "aligned face crops" : "whole images";
    const calibrated = info.calibration ? `calibrated, operating point ${point.name}` : "uncalibrated";
    $("model").textContent = `${info.backbone} (${info.method}), ${info.preprocessing.input_size} px ${crops}, ` +
      `${calibrated} (threshold ${point.threshold.toFixed(4)}), checkpoint ${info.checksum.slice(0, 19)}…`;
  } catch (err) {
    $("model").textContent = `model description unavailable: ${err.message}`;
  }
}

function showPreview(file) {
  const box = $("preview");
  box.replaceChildren();
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  const isVideo = file.type.startsWith("video/");
  const element = document.createElement(isVideo ? "video" : "img");
  element.src = previewUrl;
  if (isVideo) { element.controls = true; element.muted = true; } else { element.alt = "the uploaded image"; }
  // A preview the browser cannot show (an odd format) is simply left out; the verdict does not need it.
  element.onerror = () => element.remove();
  box.append(element);
}

function addDetail(term, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = term;
  dd.textContent = value;
  $("details").append(dt, dd);
}

function reset() {
  for (const id of ["verdict", "score", "error"]) $(id).textContent = "";
  $("verdict").className = "";
  $("details").replaceChildren();
  $("frame-plot").replaceChildren();
  $("map-grid").replaceChildren();
  $("frames").hidden = true;
  $("maps").hidden = true;
}

function showResult(result) {
  if (result.score !== null && result.score !== undefined) {
    $("verdict").textContent = result.label === "fake" ? "Fake" : "Real";
    $("verdict").className = result.label;
    $("score").textContent = `P(fake) = ${result.score.toFixed(4)}`;
  }
  addDetail("file", result.input ?? "");
  if (result.kind) addDetail("kind", result.kind);
  addDetail("faces found", result.faces === null ? "not looked for (the model scores whole images)" : String(result.faces));
  if (result.frames !== null && result.frames !== undefined) addDetail("frames scored", String(result.frames));
  if (result.operating_point) {
    const op = result.operating_point;
    addDetail("decided at", `${op.name} (${op.level} level): fake when P(fake) ≥ ${op.threshold.toFixed(4)}`);
  }
  if (result.raw_score !== null && result.raw_score !== undefined) {
    addDetail("network's own score", result.raw_score.toFixed(4));
  }
  if (result.note) addDetail("note", result.note);
  if (result.error) $("error").textContent = result.error;
  if (result.frame_scores && result.frame_scores.length) plotFrames(result.frame_scores);
  if (result.explanation && result.explanation.length) showMaps(result.explanation);
}

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function plotFrames(frames) {
  const plot = $("frame-plot");
  const [width, height, left, right, top, bottom] = [640, 220, 44, 16, 12, 34];
  const last = Math.max(1, frames[frames.length - 1].frame);
  const x = (frame) => left + (frame / last) * (width - left - right);
  const y = (score) => top + (1 - score) * (height - top - bottom);
  plot.append(svg("line", { class: "axis", x1: left, y1: y(0), x2: width - right, y2: y(0) }));
  plot.append(svg("line", { class: "axis", x1: left, y1: y(0), x2: left, y2: y(1) }));
  for (const tick of [0, 0.5, 1]) plot.append(svg("text", { x: 8, y: y(tick) + 4 }, tick.toFixed(1)));
  plot.append(svg("line", { class: "threshold", x1: left, y1: y(threshold), x2: width - right, y2: y(threshold) }));
  plot.append(svg("text", { x: width / 2 - 20, y: height - 6 }, "frame"));
  for (const f of [frames[0], frames[frames.length - 1]]) {
    plot.append(svg("text", { x: x(f.frame) - 4, y: y(0) + 16 }, String(f.frame)));
  }
  const points = frames.map((f) => `${x(f.frame).toFixed(1)},${y(f.score).toFixed(1)}`).join(" ");
  plot.append(svg("polyline", { class: "line", points }));
  for (const f of frames) {
    const dot = svg("circle", { cx: x(f.frame), cy: y(f.score), r: 3.5 });
    dot.append(svg("title", {}, `frame ${f.frame}: ${f.score.toFixed(4)}`));
    plot.append(dot);
  }
  $("frames").hidden = false;
}

function showMaps(explanation) {
  for (const item of explanation) {
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = item.map;
    image.alt = `explanation map of frame ${item.frame}`;
    const caption = document.createElement("figcaption");
    caption.textContent = `frame ${item.frame}: ${item.score.toFixed(3)}`;
    figure.append(image, caption);
    $("map-grid").append(figure);
  }
  $("maps").hidden = false;
}

async function detect(file) {
  reset();
  $("result").hidden = false;
  showPreview(file);
  $("status").textContent = `scoring ${file.name}…`;
  const form = new FormData();
  form.append("file", file, file.name);
  const explain = $("explain").checked ? "true" : "false";
  try {
    const response = await fetch(`/v1/detect?explain=${explain}`, { method: "POST", body: form, headers: headers() });
    const body = await response.json();
    if (response.ok || body.input !== undefined) showResult(body);
    if (!response.ok) $("error").textContent = body.error || response.statusText;
    // Set last: "done" means everything above is on the page.
    $("status").textContent = response.ok ? "done" : `refused (HTTP ${response.status})`;
  } catch (err) {
    $("status").textContent = "failed";
    $("error").textContent = `the service could not be reached: ${err.message}`;
  }
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) detect(event.target.files[0]);
    event.target.value = "";  // choosing the same file again scores it again
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) detect(event.dataTransfer.files[0]);
  });
  $("key").value = sessionStorage.getItem("masm-api-key") || "";
  $("key").addEventListener("change", () => { sessionStorage.setItem("masm-api-key", $("key").value); describeModel(); });
  describeModel();
}

setup();
