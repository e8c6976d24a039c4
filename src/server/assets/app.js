// The voice page: one WebSocket session on /ws, microphone in, reply audio out.
// Plain browser JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

(() => {
  const SAMPLE_RATE = 16000; // what the page asks the server for
  const FRAME_MS = 20;
  const PLAYBACK_LEAD = 0.06; // s of slack before the first chunk after a gap

  const $ = (id) => document.getElementById(id);
  const ui = {
    userId: $("user-id"), token: $("token"), connect: $("connect"), disconnect: $("disconnect"),
    conn: $("conn"), sessionId: $("session-id"), pipeline: $("pipeline"), closeInfo: $("close-info"),
    talk: $("talk"), toggle: $("toggle"), level: $("level"), conversation: $("conversation"),
    textForm: $("text-form"), text: $("text"), send: $("send"), latency: $("latency"), events: $("events"),
  };

  // Counters for automated tests (see the page's "How this page works").
  const test = {
    ready: false,
    sessionId: null,
    states: [],
    events: {},
    framesSent: 0,
    textsSent: 0,
    transcripts: [], // the user's final transcripts, in order
    agentTexts: [], // the agent's replies, in order
    replyFramesReceived: 0,
    replySamplesPlayed: 0,
    interrupted: 0,
    lastLatency: null,
    closed: null,
  };
  window.voiceTest = test;

  let ws = null;
  let ctx = null; // one AudioContext for capture and playback
  let mic = null; // { stream, source, node, sink }
  let talking = false;
  let replyRate = SAMPLE_RATE;
  let playhead = 0; // AudioContext time where the next reply chunk starts
  const playing = new Set(); // scheduled AudioBufferSourceNodes
  let partial = null; // the <li> of the user's transcript in progress

  // ---- display -------------------------------------------------------------

  function logEvent(text, cls) {
    const li = document.createElement("li");
    if (cls) li.className = cls;
    const time = document.createElement("time");
    time.textContent = new Date().toLocaleTimeString();
    li.append(time, text);
    ui.events.append(li);
    while (ui.events.children.length > 200) ui.events.firstElementChild.remove();
    ui.events.scrollTop = ui.events.scrollHeight;
  }

  function say(cls, text) {
    const li = document.createElement("li");
    li.className = cls;
    li.textContent = text;
    ui.conversation.append(li);
    ui.conversation.scrollTop = ui.conversation.scrollHeight;
    return li;
  }

  function setPipeline(state) {
    ui.pipeline.textContent = state;
    ui.pipeline.className = "badge " + state;
  }

  function setConnected(on) {
    ui.connect.disabled = on;
    ui.disconnect.disabled = !on;
    ui.userId.disabled = on;
    ui.token.disabled = on;
  }

  function setReady(on) {
    ui.talk.disabled = !on;
    ui.text.disabled = !on;
    ui.send.disabled = !on;
    if (!on) setTalking(false);
  }

  function setTalking(on) {
    talking = on;
    ui.talk.setAttribute("aria-pressed", String(on));
    ui.talk.textContent = on ? (ui.toggle.checked ? "Talking — click to stop" : "Talking — release to stop")
      : (ui.toggle.checked ? "Click to talk" : "Hold to talk");
  }

  // Milliseconds as shown: whole ones from 10 ms, one decimal from 1 ms, two
  // below (an in-process reply, such as the echo's, starts within a fraction
  // of a millisecond of the turn's end: not 0.0), "<0.01" below that, and a
  // dash when the stage did not run (no STT, no agent, no synthesis).
  const ms = (v) => {
    if (typeof v !== "number" || !Number.isFinite(v) || v < 0) return "—";
    if (v >= 10) return Math.round(v).toString();
    if (v >= 1) return v.toFixed(1);
    return v >= 0.01 ? v.toFixed(2) : "<0.01";
  };

  test.formatMs = ms; // the table's formatting, for tests

  function showLatency(l) {
    const tr = document.createElement("tr");
    const turn = document.createElement("td");
    turn.textContent = String(l.turn);
    tr.append(turn);
    for (const v of [l.endpointing_ms, l.stt_ms, l.agent_ms, l.tts_first_audio_ms, l.first_audio_ms]) {
      const td = document.createElement("td");
      td.textContent = ms(v);
      tr.append(td);
    }
    ui.latency.prepend(tr);
    while (ui.latency.children.length > 20) ui.latency.lastElementChild.remove();
  }

  // ---- audio ---------------------------------------------------------------

  function audioContext() {
    if (!ctx) ctx = new AudioContext({ latencyHint: "interactive" });
    if (ctx.state === "suspended") ctx.resume().catch(() => {});
    return ctx;
  }

  async function openMicrophone() {
    const ac = audioContext();
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    await ac.audioWorklet.addModule(new URL("pcm-worklet.js", document.baseURI).href);
    const source = ac.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ac, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      channelCount: 1,
      channelCountMode: "explicit",
      processorOptions: { targetRate: SAMPLE_RATE, frameMs: FRAME_MS },
    });
    node.port.onmessage = (e) => onMicFrame(new Int16Array(e.data));
    // A silent sink keeps the worklet pulled by the audio graph.
    const sink = ac.createGain();
    sink.gain.value = 0;
    source.connect(node).connect(sink).connect(ac.destination);
    mic = { stream, source, node, sink };
    logEvent(`microphone open: ${ac.sampleRate} Hz resampled to ${SAMPLE_RATE} Hz`);
  }

  function closeMicrophone() {
    if (!mic) return;
    mic.node.port.onmessage = null;
    mic.source.disconnect();
    mic.node.disconnect();
    mic.sink.disconnect();
    for (const t of mic.stream.getTracks()) t.stop();
    mic = null;
    ui.level.value = 0;
  }

  let levelPeak = 0;
  function onMicFrame(frame) {
    // While the button is up the frame goes out as silence: the server's audio
    // clock keeps running, so its endpointing ends the turn on release.
    if (!talking) frame.fill(0);
    let sum = 0;
    for (let i = 0; i < frame.length; i++) sum += frame[i] * frame[i];
    const rms = Math.sqrt(sum / frame.length) / 32768;
    const level = rms > 0 ? Math.max(0, 1 + Math.log10(rms) / 3) : 0; // -60 dBFS..0 dBFS
    levelPeak = Math.max(level, levelPeak * 0.9);
    ui.level.value = levelPeak;
    if (ws && ws.readyState === WebSocket.OPEN && test.ready) {
      ws.send(frame.buffer);
      test.framesSent++;
    }
  }

  function playReply(data) {
    test.replyFramesReceived++;
    const samples = new Int16Array(data);
    if (samples.length === 0 || !ctx) return;
    const buffer = ctx.createBuffer(1, samples.length, replyRate);
    const ch = buffer.getChannelData(0);
    for (let i = 0; i < samples.length; i++) ch[i] = samples[i] / 32768;
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(ctx.destination);
    // Back to back: each chunk starts where the previous one ends.
    const now = ctx.currentTime;
    if (playhead < now + 0.005) playhead = now + PLAYBACK_LEAD;
    src.start(playhead);
    playhead += buffer.duration;
    playing.add(src);
    src.onended = () => playing.delete(src);
    test.replySamplesPlayed += samples.length;
  }

  function stopPlayback() {
    for (const src of playing) {
      src.onended = null;
      try { src.stop(); } catch (_) { /* not started yet */ }
      src.disconnect();
    }
    playing.clear();
    playhead = 0;
  }

  // ---- session -------------------------------------------------------------

  async function connect({ autostart = false } = {}) {
    if (ws) return;
    test.ready = false;
    test.closed = null;
    ui.closeInfo.textContent = "—";
    setConnected(true);
    audioContext(); // created in the click, so the browser lets it play
    try {
      if (!mic) await openMicrophone();
    } catch (err) {
      logEvent(`microphone unavailable (${err.name || err}): you can still type`, "error");
    }
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/ws`;
    ui.conn.textContent = "connecting…";
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    ws = socket;
    socket.onopen = () => {
      ui.conn.textContent = "connected, starting session…";
      const start = { type: "start", user_id: ui.userId.value.trim() || "web-user", sample_rate: SAMPLE_RATE };
      if (ui.token.value) start.token = ui.token.value;
      socket.send(JSON.stringify(start));
    };
    socket.onmessage = (e) => {
      if (typeof e.data === "string") onMessage(JSON.parse(e.data), autostart);
      else playReply(e.data);
    };
    socket.onerror = () => logEvent("WebSocket error", "error");
    socket.onclose = (e) => {
      if (ws === socket) ws = null;
      test.ready = false;
      test.closed = { code: e.code, reason: e.reason };
      const text = `${e.code}${e.reason ? " " + e.reason : ""}`;
      ui.closeInfo.textContent = text;
      ui.conn.textContent = "closed";
      logEvent(`connection closed: ${text}`, e.code === 1000 ? "" : "error");
      stopPlayback();
      closeMicrophone();
      setReady(false);
      setConnected(false);
      setPipeline("closed");
    };
  }

  function count(type) {
    test.events[type] = (test.events[type] || 0) + 1;
  }

  function onMessage(msg, autostart) {
    count(msg.type);
    switch (msg.type) {
      case "ready":
        test.ready = true;
        test.sessionId = msg.session_id;
        replyRate = msg.sample_rate || SAMPLE_RATE;
        ui.conn.textContent = `ready (${msg.encoding || "pcm_s16le"}, ${replyRate} Hz, ${msg.channels || 1} ch)`;
        ui.sessionId.textContent = msg.session_id;
        logEvent(`session ${msg.session_id} ready`);
        setReady(true);
        if (autostart && mic) setTalking(true);
        break;
      case "state":
        test.states.push(msg.to);
        setPipeline(msg.to);
        logEvent(`state ${msg.from} → ${msg.to}`);
        break;
      case "speech_started":
        logEvent("speech started");
        break;
      case "turn_ended":
        logEvent(`turn ${msg.turn} ended`);
        break;
      case "user_transcript":
        if (!partial) partial = say("user partial", "");
        partial.textContent = msg.text;
        if (msg.is_final) {
          test.transcripts.push(msg.text);
          partial.className = "user";
          partial = null;
        }
        break;
      case "agent_text":
        test.agentTexts.push(msg.text);
        say("agent", msg.text);
        break;
      case "interrupted":
        test.interrupted++;
        stopPlayback();
        say("note", `(interrupted turn ${msg.turn})`);
        logEvent(`interrupted turn ${msg.turn}: reply audio dropped`);
        break;
      case "latency":
        test.lastLatency = msg;
        showLatency(msg);
        logEvent(`turn ${msg.turn}: first audio after ${ms(msg.first_audio_ms)} ms`);
        break;
      case "error":
        logEvent(`error ${msg.code}: ${msg.message}`, "error");
        break;
      case "closed":
        logEvent("session closed");
        setReady(false);
        break;
      default:
        logEvent(`${msg.type}: ${JSON.stringify(msg)}`);
    }
  }

  // Asks the server to end the session (it finishes the turn in flight, then
  // closes); closes from this side if it has not within 10 s.
  function disconnect() {
    const socket = ws;
    if (!socket) return;
    setTalking(false);
    if (socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "stop" }));
      ui.conn.textContent = "stopping…";
      setTimeout(() => { if (socket.readyState !== WebSocket.CLOSED) socket.close(1000, "client left"); }, 10000);
    } else {
      socket.close(1000, "client left");
    }
  }

  // ---- controls ------------------------------------------------------------

  ui.connect.addEventListener("click", () => connect());
  ui.disconnect.addEventListener("click", disconnect);

  ui.textForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.text.value.trim();
    if (!text || !ws || !test.ready) return;
    // Shown once the server's `user_transcript` for it comes back, in turn
    // order with what is said.
    ws.send(JSON.stringify({ type: "text", text }));
    test.textsSent++;
    ui.text.value = "";
  });

  // Hold mode: pointer or Space/Enter held down. Toggle mode: click.
  ui.talk.addEventListener("pointerdown", (e) => {
    if (ui.toggle.checked || ui.talk.disabled) return;
    ui.talk.setPointerCapture(e.pointerId);
    audioContext();
    setTalking(true);
  });
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
    ui.talk.addEventListener(type, () => { if (!ui.toggle.checked) setTalking(false); });
  }
  ui.talk.addEventListener("keydown", (e) => {
    if (ui.toggle.checked || (e.key !== " " && e.key !== "Enter")) return;
    e.preventDefault();
    if (!e.repeat) setTalking(true);
  });
  ui.talk.addEventListener("keyup", (e) => {
    if (ui.toggle.checked || (e.key !== " " && e.key !== "Enter")) return;
    e.preventDefault();
    setTalking(false);
  });
  ui.talk.addEventListener("blur", () => { if (!ui.toggle.checked) setTalking(false); });
  ui.talk.addEventListener("click", () => {
    if (!ui.toggle.checked) return;
    audioContext();
    setTalking(!talking);
  });
  ui.toggle.addEventListener("change", () => setTalking(false));
  ui.talk.addEventListener("contextmenu", (e) => e.preventDefault());

  setTalking(false);
  setPipeline("—");
  if (new URLSearchParams(location.search).get("autostart") === "1") {
    logEvent("autostart: connecting and streaming the microphone");
    connect({ autostart: true });
  }
})();
