// The telcoflow console: the live view (a WebSocket at /console/v1/live) and the browser
// phone (a simulated phone on /v1/sim/phone). Plain JS, no dependency. The connector's
// credentials stay in this page's memory and go only in the first frame of each WebSocket.
"use strict";

const PHONE_RATE = 16000;
const $ = (id) => document.getElementById(id);
const wsBase = (location.protocol === "https:" ? "wss://" : "ws://") + location.host;

let creds = null; // {connectorUuid, apiKey}

// ---------- live view ----------

let live = null;
let loggedIn = false;

function connectLive() {
  live = new WebSocket(wsBase + "/console/v1/live");
  live.onopen = () => live.send(JSON.stringify({ type: "auth", ...creds }));
  live.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    if (msg.type === "welcome") onWelcome(msg);
    else if (msg.type === "snapshot") render(msg);
  };
  live.onclose = (e) => {
    setLink("offline");
    if (!loggedIn) {
      $("login-error").textContent = e.reason || "the server refused the connection";
      $("login-button").disabled = false;
      creds = null;
      return;
    }
    setTimeout(connectLive, 2000); // the server went away: try again
  };
}

function setLink(state) {
  $("link-state").dataset.state = state;
  $("link-state").textContent = state;
}

function onWelcome(msg) {
  loggedIn = true;
  setLink("live");
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").textContent = (msg.connectorName || "connector") + " · " + msg.connectorUuid;
  const list = $("phone-numbers");
  list.replaceChildren();
  for (const n of msg.numbers) {
    if (n === "*") continue;
    const o = document.createElement("option");
    o.value = n;
    list.append(o);
  }
  if (!$("phone-to").value) {
    $("phone-to").value = msg.numbers.find((n) => n !== "*") || "+15559990001";
  }
  phoneAvailable = Boolean(msg.simPhones);
  if (phoneAvailable) {
    if ($("phone-status").dataset.state === "unavailable") setStatus("idle");
  } else {
    // The browser phone is a simulated phone: without them it could only fail.
    setStatus("unavailable", "unavailable: this server has simulated phones off ([sim] enabled = false)");
  }
  setButtons();
}

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  $("login-error").textContent = "";
  $("login-button").disabled = true;
  creds = { connectorUuid: $("login-uuid").value.trim(), apiKey: $("login-key").value };
  connectLive();
});

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fillTable(id, rows, columns, emptyText) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(emptyText, "empty");
    td.colSpan = columns;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const r of rows) body.append(r);
}

function row(key, cells) {
  const tr = document.createElement("tr");
  if (key) tr.dataset.callId = key;
  for (const c of cells) tr.append(typeof c === "string" ? cell(c) : c);
  return tr;
}

function duration(ms) {
  if (ms == null) return "–";
  const s = Math.floor(ms / 1000);
  return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
}

function levelCell(dbfs) {
  const td = document.createElement("td");
  const m = document.createElement("meter");
  m.min = -96; m.max = 0; m.value = dbfs;
  td.append(m, " " + dbfs.toFixed(0) + " dBFS");
  return td;
}

function quality(q) {
  const parts = [];
  // The caller's codec (SIP), then receive statistics, when the server reports them.
  if (q.codec != null) parts.push(q.codec === "G722" ? "G722 (HD)" : q.codec);
  if (q.mos != null) parts.push("MOS " + Number(q.mos).toFixed(1));
  if (q.jitterMs != null) parts.push("jitter " + Number(q.jitterMs).toFixed(1) + " ms");
  if (q.lossPct != null) parts.push("loss " + Number(q.lossPct).toFixed(1) + "%");
  if (q.rttMs != null) parts.push("RTT " + Number(q.rttMs).toFixed(0) + " ms");
  parts.push("frames in/out " + q.framesFromCaller + "/" + q.framesToCaller);
  parts.push("dropped " + q.framesDropped);
  parts.push("gaps " + q.playoutGaps);
  return parts.join(" · ");
}

// The latest quality figures of each running call: a call busy answering other stats
// requests reports none for a moment, and the page keeps showing the last it had.
let lastStats = new Map();

function withLastStats(calls) {
  const seen = new Map();
  for (const c of calls) {
    const q = c.quality;
    if (q.stats) {
      seen.set(c.callId, q);
    } else if (lastStats.has(c.callId)) {
      const last = lastStats.get(c.callId);
      for (const k of ["codec", "jitterMs", "lossPct", "concealedMs", "mos", "rttMs", "stats"]) {
        if (last[k] !== undefined) q[k] = last[k];
      }
      seen.set(c.callId, q);
    }
  }
  lastStats = seen;
}

function render(s) {
  withLastStats(s.calls);
  const more = s.callsTotal - s.calls.length;
  const foot = $("calls").tFoot;
  foot.replaceChildren();
  if (more > 0) {
    const td = cell("and " + more + " more", "empty");
    td.colSpan = 8;
    foot.append(row(null, [td]));
  }
  fillTable("calls", s.calls.map((c) => row(c.callId, [
    c.from, c.to, c.state, duration(c.durationMs),
    c.agent.mediaAttached ? "media up" : (c.agent.controlId ? "claimed" : "none"),
    levelCell(c.levels.fromCallerDbfs), levelCell(c.levels.toCallerDbfs), cell(quality(c.quality), "quality"),
  ])), 8, "no call in progress");
  fillTable("agents", s.agents.map((a) => row(null, [
    a.controlId.slice(0, 8), String(a.sampleRate), a.audioMode, a.inboundCalls ? "yes" : "no",
    String(a.sessionsHeld),
  ])), 5, "no agent connected");
  fillTable("sessions", s.sessions.map((x) => row(null, [
    x.id.slice(0, 8), x.remoteAddress, x.localAddress,
    new Date(x.openedAt * 1000).toLocaleTimeString(), x.heldBy ? x.heldBy.slice(0, 8) : "–",
  ])), 5, "no open session");
  fillTable("ended", s.ended.map((c) => row(c.callId, [
    c.from, c.to, c.outcome, new Date(c.startedAtMs).toLocaleTimeString(),
    duration(c.durationMs), duration(c.talkMs), cell(quality(c.quality), "quality"),
  ])), 7, "no call has ended yet");
}

// ---------- browser phone ----------

let audio = null; // {ctx, node, stream, source}
let phone = null; // the phone's WebSocket
let phoneMode = null; // "dial" | "wait"
let inCall = false;
let phoneAvailable = true; // the server takes simulated phones (welcome's simPhones)

function setStatus(state, text) {
  const el = $("phone-status");
  el.dataset.state = state;
  el.textContent = text || state;
}

function setButtons() {
  const busy = phone !== null;
  $("phone-dial").disabled = busy || !phoneAvailable;
  $("phone-wait").disabled = busy || !phoneAvailable;
  $("phone-hangup").disabled = !busy;
  $("phone-aec").disabled = busy || !phoneAvailable;
  for (const b of $("dtmf").querySelectorAll("button")) b.disabled = !phoneAvailable;
}

async function startAudio() {
  if (audio) return audio;
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/console/phone-worklet.js");
  const aec = $("phone-aec").checked;
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: aec, noiseSuppression: aec, autoGainControl: aec, channelCount: 1 },
  });
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "phone-io", {
    numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: { phoneRate: PHONE_RATE },
  });
  node.port.onmessage = (e) => {
    if (e.data.type !== "frame") return;
    $("mic-level").value = levelDbfs(new Int16Array(e.data.pcm));
    if (inCall && phone && phone.readyState === WebSocket.OPEN) phone.send(e.data.pcm);
  };
  source.connect(node);
  node.connect(ctx.destination);
  await ctx.resume();
  audio = { ctx, node, stream, source };
  return audio;
}

function stopAudio() {
  if (!audio) return;
  audio.stream.getTracks().forEach((t) => t.stop());
  audio.ctx.close();
  audio = null;
}

function openPhone(first) {
  const ws = new WebSocket(wsBase + "/v1/sim/phone?auth=frame");
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    ws.send(JSON.stringify({ type: "auth", ...creds }));
    ws.send(JSON.stringify(first));
  };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") return onHeard(new Int16Array(e.data));
    onPhoneEvent(JSON.parse(e.data));
  };
  ws.onclose = (e) => {
    if (phone !== ws) return;
    const why = e.reason ? ": " + e.reason : "";
    if ($("phone-status").dataset.state !== "ended" && $("phone-status").dataset.state !== "error") {
      setStatus("idle", "idle" + why);
    }
    endPhone();
  };
  phone = ws;
  setButtons();
}

function endPhone() {
  inCall = false;
  phone = null;
  phoneMode = null;
  $("phone-answer").disabled = true;
  $("phone-reject").disabled = true;
  if (audio) {
    audio.node.port.postMessage({ type: "send", on: false });
    audio.node.port.postMessage({ type: "stop" });
  }
  stopAudio();
  setButtons();
}

function startTalking() {
  inCall = true;
  audio.node.port.postMessage({ type: "send", on: true });
}

function onPhoneEvent(ev) {
  const status = $("phone-status");
  switch (ev.type) {
    case "trying": status.dataset.callId = ev.callId; setStatus("trying", "trying " + ev.callId); break;
    case "ringing": setStatus("ringing", "ringing…"); break;
    case "registered": setStatus("waiting", "waiting at " + ev.number); break;
    case "incoming":
      status.dataset.callId = ev.callId;
      setStatus("incoming", "incoming call from " + ev.from);
      $("phone-answer").disabled = false;
      $("phone-reject").disabled = false;
      break;
    case "answered": setStatus("answered", "in call " + ev.callId); startTalking(); break;
    case "hangup":
      inCall = false;
      audio && audio.node.port.postMessage({ type: "send", on: false });
      setStatus("ended", "call ended: " + ev.reason);
      if (phoneMode === "dial") phone.close();
      else setTimeout(() => phone && setStatus("waiting", "waiting again"), 1500);
      break;
    case "error": setStatus("error", "error: " + ev.message); break;
  }
}

$("phone-dial").addEventListener("click", async () => {
  try {
    await startAudio();
  } catch (e) {
    setStatus("error", "no microphone: " + e.message);
    return;
  }
  phoneMode = "dial";
  setStatus("dialling", "dialling " + $("phone-to").value);
  openPhone({ type: "dial", from: $("phone-from").value.trim(), to: $("phone-to").value.trim(), sampleRate: PHONE_RATE });
});

$("phone-wait").addEventListener("click", async () => {
  try {
    await startAudio();
  } catch (e) {
    setStatus("error", "no microphone: " + e.message);
    return;
  }
  phoneMode = "wait";
  openPhone({ type: "register", number: $("phone-wait-number").value.trim(), sampleRate: PHONE_RATE });
});

$("phone-hangup").addEventListener("click", () => {
  if (!phone) return;
  if (inCall || phoneMode === "dial") {
    phone.send(JSON.stringify({ type: "hangup" }));
  }
  if (!inCall && phoneMode === "wait") {
    // Not on a call: stop waiting at the number.
    phone.close();
    setStatus("idle", "stopped waiting");
    return;
  }
  setStatus("ended", "hung up");
});

$("phone-answer").addEventListener("click", () => {
  phone.send(JSON.stringify({ type: "answer" }));
  $("phone-answer").disabled = true;
  $("phone-reject").disabled = true;
});

$("phone-reject").addEventListener("click", () => {
  phone.send(JSON.stringify({ type: "reject" }));
  $("phone-answer").disabled = true;
  $("phone-reject").disabled = true;
  setStatus("waiting", "rejected; waiting again");
});

for (const b of $("dtmf").querySelectorAll("button")) {
  b.addEventListener("click", () => {
    if (phone && inCall) phone.send(JSON.stringify({ type: "dtmf", digit: b.textContent, durationMs: 100 }));
  });
}

// ---------- what the phone hears ----------

const ANALYSIS = 2048; // samples: 128 ms at 16 kHz, 7.8 Hz a bin
const heardBuf = new Float32Array(ANALYSIS);
let heardFill = 0;

function levelDbfs(pcm) {
  let sum = 0;
  for (const v of pcm) sum += v * v;
  const rms = Math.sqrt(sum / Math.max(1, pcm.length));
  return rms < 1 ? -96 : Math.max(-96, 20 * Math.log10(rms / 32768));
}

function onHeard(pcm) {
  if (audio) {
    const copy = pcm.slice().buffer;
    audio.node.port.postMessage({ type: "play", pcm: copy }, [copy]);
  }
  for (const v of pcm) {
    heardBuf[heardFill++] = v / 32768;
    if (heardFill === ANALYSIS) {
      analyse();
      heardFill = 0;
    }
  }
}

// Level and dominant frequency of the last 128 ms heard: a Hann window, an FFT, the
// strongest bin refined by parabolic interpolation.
function analyse() {
  let sum = 0;
  for (const v of heardBuf) sum += v * v;
  const rms = Math.sqrt(sum / ANALYSIS);
  const dbfs = rms > 0 ? Math.max(-96, 20 * Math.log10(rms)) : -96;
  const heard = $("heard");
  heard.dataset.level = dbfs.toFixed(1);
  $("heard-level").value = dbfs;
  if (dbfs < -50) {
    heard.dataset.frequency = "";
    $("heard-text").textContent = "silence";
    return;
  }
  const re = new Float32Array(ANALYSIS);
  const im = new Float32Array(ANALYSIS);
  for (let i = 0; i < ANALYSIS; i++) {
    re[i] = heardBuf[i] * (0.5 - 0.5 * Math.cos((2 * Math.PI * i) / (ANALYSIS - 1)));
  }
  fft(re, im);
  let best = 1;
  let bestMag = 0;
  const mags = new Float32Array(ANALYSIS / 2);
  for (let k = 1; k < ANALYSIS / 2; k++) {
    mags[k] = Math.hypot(re[k], im[k]);
    if (mags[k] > bestMag) { bestMag = mags[k]; best = k; }
  }
  let shift = 0;
  if (best > 1 && best < ANALYSIS / 2 - 1) {
    const a = mags[best - 1], b = mags[best], c = mags[best + 1];
    const d = a - 2 * b + c;
    if (d !== 0) shift = (0.5 * (a - c)) / d;
  }
  const hz = ((best + shift) * PHONE_RATE) / ANALYSIS;
  heard.dataset.frequency = hz.toFixed(1);
  $("heard-text").textContent = hz.toFixed(0) + " Hz at " + dbfs.toFixed(0) + " dBFS";
}

// In-place radix-2 FFT.
function fft(re, im) {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) {
      [re[i], re[j]] = [re[j], re[i]];
      [im[i], im[j]] = [im[j], im[i]];
    }
  }
  for (let len = 2; len <= n; len <<= 1) {
    const ang = (-2 * Math.PI) / len;
    const wr = Math.cos(ang), wi = Math.sin(ang);
    for (let i = 0; i < n; i += len) {
      let cr = 1, ci = 0;
      for (let k = 0; k < len / 2; k++) {
        const ar = re[i + k], ai = im[i + k];
        const br = re[i + k + len / 2] * cr - im[i + k + len / 2] * ci;
        const bi = re[i + k + len / 2] * ci + im[i + k + len / 2] * cr;
        re[i + k] = ar + br; im[i + k] = ai + bi;
        re[i + k + len / 2] = ar - br; im[i + k + len / 2] = ai - bi;
        const t = cr * wr - ci * wi;
        ci = cr * wi + ci * wr;
        cr = t;
      }
    }
  }
}
