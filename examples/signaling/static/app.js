// turnpike meeting page: WebSocket signaling, a mesh of RTCPeerConnections
// with perfect negotiation, TURN credentials from the server, chat over a
// DataChannel and a per-peer stats panel. Vanilla JS, no build step.
//
// URL parameters:
//   /r/<room>        the room (or ?room=<room> on /)
//   ?name=<name>     display name
//   ?autostart=1     join at once, no clicks (a random room on /)
//   ?relay=1         start with "relay only" (iceTransportPolicy: "relay")
//   ?media=0         join without camera and microphone
//
// window.turnpikeTest exposes the state for automated browsers.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const MAX_CHAT = 1000;
  const MAX_LOG = 500;
  const STATS_EVERY_MS = 1000;
  const MAX_RETRIES = 6;
  // Close codes the server uses for "do not come back right away".
  const CLOSE_ROOM_FULL = 4001;
  const FATAL_CLOSES = new Map([
    [CLOSE_ROOM_FULL, 'This room is full. Try another room.'],
    [1008, 'The server closed the connection (too many messages).'],
    [1009, 'The server closed the connection (message too large).'],
  ]);

  const state = {
    room: null,
    name: '',
    id: null,
    ws: null,
    // idle | joining | joined | reconnecting | left | error
    phase: 'idle',
    wantJoined: false,
    retries: 0,
    retryTimer: null,
    ice: null,
    iceTimer: null,
    localStream: null,
    cameraTrack: null,
    screenTrack: null,
    micMuted: false,
    cameraOff: false,
    relayOnly: params.get('relay') === '1',
    peers: new Map(),
    chat: [],
    log: [],
    errors: [],
    statsTimer: null,
    statsBusy: false,
    joinWaiters: [],
  };

  // ---------------------------------------------------------------- helpers

  function log(text) {
    const line = `${new Date().toISOString().slice(11, 23)} ${text}`;
    state.log.push(line);
    if (state.log.length > MAX_LOG) state.log.shift();
    console.log('[turnpike]', text);
  }

  function setStatus(text, kind) {
    const el = $('status');
    el.textContent = text;
    el.className = kind || '';
  }

  function hex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  const WORDS = ['amber', 'brisk', 'cedar', 'delta', 'ember', 'fjord', 'grove', 'harbor',
    'iris', 'juniper', 'kestrel', 'lumen', 'maple', 'nova', 'orbit', 'pine', 'quartz',
    'river', 'sierra', 'tundra', 'umber', 'vale', 'willow', 'xenon', 'yarrow', 'zephyr'];

  function randomRoomName() {
    const b = crypto.getRandomValues(new Uint8Array(6));
    return `${WORDS[b[0] % WORDS.length]}-${WORDS[b[1] % WORDS.length]}-${hex(b.slice(2))}`;
  }

  function roomFromUrl() {
    const m = location.pathname.match(/^\/r\/([^/]+)\/?$/);
    let room = null;
    if (m) {
      try { room = decodeURIComponent(m[1]); } catch (_) { room = null; }
    } else {
      room = params.get('room');
    }
    return room && ROOM_RE.test(room) ? room : null;
  }

  function cleanName(raw) {
    // eslint-disable-next-line no-control-regex
    const name = String(raw || '').replace(/[\u0000-\u001f\u007f]/g, '').trim().slice(0, 32);
    return name || 'guest';
  }

  // The REST "user" part of a TURN username: what the server accepts.
  function restUser(name) {
    return name.replace(/[^A-Za-z0-9_.@-]/g, '_').slice(0, 64) || 'guest';
  }

  function storageGet(key) {
    try { return localStorage.getItem(key); } catch (_) { return null; }
  }

  function storageSet(key, value) {
    try { localStorage.setItem(key, value); } catch (_) { /* private mode */ }
  }

  // ------------------------------------------------------------------ setup

  function init() {
    const fresh = randomRoomName();
    $('new-room').href = `/r/${fresh}`;
    $('landing-new-room').href = `/r/${fresh}`;

    state.room = roomFromUrl();
    if (!state.room && params.get('autostart') === '1') {
      state.room = fresh;
      history.replaceState(null, '', `/r/${fresh}${location.search}`);
    }
    if (!state.room) {
      $('landing').hidden = false;
      $('room-form').addEventListener('submit', (ev) => {
        ev.preventDefault();
        const room = $('room-input').value.trim();
        if (ROOM_RE.test(room)) location.href = `/r/${room}`;
        else setStatus('Room names are 1 to 64 of A-Z a-z 0-9 _ -', 'error');
      });
      setStatus('Pick a room.');
      return;
    }

    $('room-name').textContent = state.room;
    document.title = `${state.room} · turnpike meeting`;
    $('controls').hidden = false;
    $('meeting').hidden = false;
    if (navigator.clipboard && navigator.clipboard.writeText) {
      $('copy-link').hidden = false;
      $('copy-link').addEventListener('click', () => {
        const url = `${location.origin}/r/${state.room}`;
        navigator.clipboard.writeText(url).then(
          () => setStatus(`Copied ${url}`),
          () => setStatus(`Share this address: ${url}`));
      });
    }

    $('name').value = cleanName(params.get('name') || storageGet('turnpike-name') ||
      `guest-${hex(crypto.getRandomValues(new Uint8Array(2)))}`);
    $('relay-only').checked = state.relayOnly;

    $('join').addEventListener('click', () => { join().catch(() => {}); });
    $('leave').addEventListener('click', () => leave());
    $('mute').addEventListener('click', () => toggleMute());
    $('camera').addEventListener('click', () => toggleCamera());
    $('share').addEventListener('click', () => { toggleShare(); });
    $('reconnect').addEventListener('click', () => { reconnect().catch(() => {}); });
    $('relay-only').addEventListener('change', (ev) => setRelayOnly(ev.target.checked));
    $('chat-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const input = $('chat-input');
      if (sendChat(input.value) !== null) input.value = '';
    });
    window.addEventListener('pagehide', () => {
      if (state.ws) sendSignal({ type: 'leave' });
    });

    updateButtons();
    if (params.get('autostart') === '1') {
      join().catch(() => { /* reported in the status line */ });
    } else {
      setStatus('Press Join to enter the room.');
    }
  }

  function updateButtons() {
    const inRoom = state.phase === 'joined';
    const busy = state.phase === 'joining' || state.phase === 'reconnecting';
    $('join').disabled = inRoom || busy;
    $('leave').disabled = !(inRoom || busy);
    $('reconnect').disabled = !inRoom;
    $('name').disabled = inRoom || busy;
    const s = state.localStream;
    $('mute').disabled = !(s && s.getAudioTracks().length);
    $('camera').disabled = !state.cameraTrack;
    $('share').disabled = !inRoom;
    $('mute').textContent = state.micMuted ? 'Unmute' : 'Mute';
    $('mute').setAttribute('aria-pressed', String(state.micMuted));
    $('camera').textContent = state.cameraOff ? 'Camera on' : 'Camera off';
    $('camera').setAttribute('aria-pressed', String(state.cameraOff));
    $('share').textContent = state.screenTrack ? 'Stop sharing' : 'Share screen';
    $('share').setAttribute('aria-pressed', String(!!state.screenTrack));
    const badges = [];
    if (state.micMuted) badges.push('muted');
    if (state.cameraOff) badges.push('camera off');
    if (state.screenTrack) badges.push('sharing');
    if (state.relayOnly) badges.push('relay only');
    $('local-badge').textContent = badges.join(' · ');
  }

  // ------------------------------------------------------------ local media

  async function ensureLocalMedia() {
    if (state.localStream || params.get('media') === '0') return;
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      note('Camera and microphone need a secure page (https://, or http://localhost); ' +
        'joining without them.');
      return;
    }
    const attempts = [
      { audio: true, video: { width: { ideal: 640 }, height: { ideal: 360 } } },
      { audio: true },
      { video: true },
    ];
    let lastError = null;
    for (const constraints of attempts) {
      try {
        state.localStream = await navigator.mediaDevices.getUserMedia(constraints);
        break;
      } catch (e) {
        lastError = e;
      }
    }
    if (!state.localStream) {
      note(`No camera or microphone (${lastError ? lastError.name : 'unavailable'}); ` +
        'joining without them.');
      return;
    }
    state.cameraTrack = state.localStream.getVideoTracks()[0] || null;
    for (const t of state.localStream.getAudioTracks()) t.enabled = !state.micMuted;
    if (state.cameraTrack) state.cameraTrack.enabled = !state.cameraOff;
    showLocalPreview();
    log(`local media: ${state.localStream.getTracks().map((t) => t.kind).join(', ')}`);
  }

  function showLocalPreview() {
    const video = $('local-video');
    const track = state.screenTrack || state.cameraTrack;
    video.srcObject = track ? new MediaStream([track]) : null;
    video.play().catch(() => { /* muted preview: autoplay always allowed */ });
  }

  function note(text) {
    log(text);
    addChat({ from: null, name: '', text, system: true });
  }

  function toggleMute(force) {
    state.micMuted = typeof force === 'boolean' ? force : !state.micMuted;
    if (state.localStream) {
      for (const t of state.localStream.getAudioTracks()) t.enabled = !state.micMuted;
    }
    updateButtons();
    return state.micMuted;
  }

  function toggleCamera(force) {
    state.cameraOff = typeof force === 'boolean' ? force : !state.cameraOff;
    if (state.cameraTrack) state.cameraTrack.enabled = !state.cameraOff;
    updateButtons();
    return state.cameraOff;
  }

  // Screen share swaps the outgoing video track on every connection with
  // replaceTrack (no renegotiation). A peer with no video sender yet (we
  // joined without a camera) gets the track added, and perfect negotiation
  // takes care of the new offer. `track` lets tests share a canvas instead
  // of going through the browser's picker.
  async function toggleShare(track) {
    if (state.screenTrack) {
      await stopShare();
      return false;
    }
    if (!track) {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) {
        setStatus('Screen sharing is not available here (it needs https:// and a desktop browser).',
          'error');
        return false;
      }
      try {
        const stream = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
        track = stream.getVideoTracks()[0];
      } catch (e) {
        setStatus(`Screen sharing cancelled (${e.name}).`);
        return false;
      }
    }
    state.screenTrack = track;
    track.addEventListener('ended', () => { if (state.screenTrack === track) stopShare(); });
    await setOutgoingVideo(track);
    showLocalPreview();
    updateButtons();
    log('screen share on');
    return true;
  }

  async function stopShare() {
    const track = state.screenTrack;
    if (!track) return;
    state.screenTrack = null;
    track.stop();
    await setOutgoingVideo(state.cameraTrack);
    showLocalPreview();
    updateButtons();
    log('screen share off');
  }

  async function setOutgoingVideo(track) {
    const jobs = [];
    for (const p of state.peers.values()) {
      if (!p.attached) continue; // picks up state.screenTrack when attaching
      if (p.videoSender) {
        jobs.push(p.videoSender.replaceTrack(track).catch((e) => log(`${p.id}: replaceTrack: ${e}`)));
      } else if (track) {
        p.videoSender = p.pc.addTrack(track, state.localStream || new MediaStream([track]));
      }
    }
    await Promise.all(jobs);
  }

  function setRelayOnly(on) {
    state.relayOnly = !!on;
    $('relay-only').checked = state.relayOnly;
    updateButtons();
    if (state.phase === 'joined' && state.peers.size) {
      setStatus(`Relay only ${state.relayOnly ? 'on' : 'off'}: applies to new connections. ` +
        'Press Reconnect to apply it to this call now.');
    }
    return state.relayOnly;
  }

  // -------------------------------------------------------------- signaling

  async function join() {
    if (state.phase === 'joining' || state.phase === 'joined' || state.phase === 'reconnecting') {
      return waitJoined();
    }
    state.name = cleanName($('name').value);
    $('name').value = state.name;
    storageSet('turnpike-name', state.name);
    state.wantJoined = true;
    state.retries = 0;
    state.phase = 'joining';
    updateButtons();
    const joined = waitJoined();
    setStatus('Starting camera and microphone…');
    await ensureLocalMedia();
    updateButtons();
    if (state.wantJoined) openSocket();
    return joined;
  }

  // Resolves with our id once the server welcomed us; rejects if the join
  // ends otherwise (room full, left).
  function waitJoined() {
    if (state.phase === 'joined') return Promise.resolve(state.id);
    return new Promise((resolve, reject) => state.joinWaiters.push({ resolve, reject }));
  }

  function settleJoinWaiters(error) {
    const waiters = state.joinWaiters;
    state.joinWaiters = [];
    for (const w of waiters) {
      if (error) w.reject(new Error(error));
      else w.resolve(state.id);
    }
  }

  function openSocket() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = `${scheme}//${location.host}/ws/${encodeURIComponent(state.room)}` +
      `?name=${encodeURIComponent(state.name)}`;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      onSocketClosed({ code: 1006, reason: String(e) });
      return;
    }
    state.ws = ws;
    setStatus('Connecting to the signaling server…');
    ws.onmessage = (ev) => {
      if (state.ws !== ws) return;
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { log('server sent something that is not JSON'); return; }
      if (!msg || typeof msg.type !== 'string') return;
      try { onSignal(msg); } catch (e) { log(`handling ${msg.type}: ${e}`); }
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      state.ws = null;
      onSocketClosed(ev);
    };
    ws.onerror = () => log('WebSocket error');
  }

  function sendSignal(msg) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  function onSignal(msg) {
    switch (msg.type) {
      case 'welcome':
        onWelcome(msg);
        break;
      case 'peer-joined':
        if (msg.peer && typeof msg.peer.id === 'string') {
          addPeer(msg.peer.id, msg.peer.name, false);
          addChat({ system: true, text: `${msg.peer.name} joined` });
          showRoomStatus();
        }
        break;
      case 'peer-left': {
        const p = state.peers.get(msg.id);
        if (p) addChat({ system: true, text: `${p.name} left` });
        removePeer(msg.id);
        showRoomStatus();
        break;
      }
      case 'offer':
      case 'answer':
        enqueue(msg.from, (p) => onDescription(p, { type: msg.type, sdp: msg.sdp }));
        break;
      case 'candidate':
        enqueue(msg.from, (p) => onCandidate(p, msg.candidate));
        break;
      case 'pong':
        break;
      case 'error':
        state.errors.push({ code: msg.code, message: msg.message, at: Date.now() });
        log(`server error ${msg.code}: ${msg.message}`);
        setStatus(`Server: ${msg.message}`, 'error');
        break;
      default:
        log(`unknown message from server: ${msg.type}`);
    }
  }

  function showRoomStatus() {
    const others = state.peers.size;
    setStatus(others ? `In room ${state.room} with ${others} other${others > 1 ? 's' : ''}.`
      : `In room ${state.room}. Share the address to invite others (up to ${state.roomSize}).`);
  }

  function onWelcome(msg) {
    state.id = msg.id;
    state.name = msg.name;
    state.phase = 'joined';
    state.retries = 0;
    setIce(msg.ice);
    $('local-name').textContent = `${msg.name} (you)`;
    state.roomSize = msg.roomSize;
    for (const peer of msg.peers || []) addPeer(peer.id, peer.name, true);
    showRoomStatus();
    const n = state.peers.size;
    log(`joined ${state.room} as ${state.id} (${n} peer${n === 1 ? '' : 's'})`);
    startStats();
    updateButtons();
    settleJoinWaiters(null);
  }

  function onSocketClosed(ev) {
    const code = ev.code;
    log(`signaling closed (${code}${ev.reason ? `: ${ev.reason}` : ''})`);
    teardownPeers();
    stopStats();
    state.id = null;
    if (!state.wantJoined) {
      state.phase = 'left';
      updateButtons();
      return;
    }
    if (FATAL_CLOSES.has(code)) {
      state.wantJoined = false;
      state.phase = 'error';
      setStatus(FATAL_CLOSES.get(code), 'error');
      settleJoinWaiters(FATAL_CLOSES.get(code));
      updateButtons();
      return;
    }
    if (state.retries >= MAX_RETRIES) {
      state.wantJoined = false;
      state.phase = 'error';
      setStatus('Lost the signaling server. Press Join to try again.', 'error');
      settleJoinWaiters('signaling server unreachable');
      updateButtons();
      return;
    }
    const delay = Math.min(30000, 1000 * 2 ** state.retries);
    state.retries += 1;
    state.phase = 'reconnecting';
    setStatus(`Connection to the signaling server lost; retrying in ${delay / 1000} s…`, 'error');
    updateButtons();
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(() => {
      if (state.wantJoined && !state.ws) openSocket();
    }, delay);
  }

  function leave() {
    state.wantJoined = false;
    clearTimeout(state.retryTimer);
    const ws = state.ws;
    if (ws) {
      sendSignal({ type: 'leave' });
      state.ws = null;
      try { ws.close(1000, 'bye'); } catch (_) { /* already closing */ }
    }
    teardownPeers();
    stopStats();
    clearTimeout(state.iceTimer);
    state.id = null;
    state.phase = 'left';
    settleJoinWaiters('left');
    setStatus('You left the room. Press Join to come back.');
    updateButtons();
  }

  // New connections pick up the current settings (relay only): leave and
  // join again. The others see us go and come back with a new id.
  async function reconnect() {
    leave();
    return join();
  }

  // ------------------------------------------------------ ICE credentials

  function setIce(ice) {
    if (!ice || !Array.isArray(ice.iceServers)) return;
    state.ice = { iceServers: ice.iceServers, ttl: ice.ttl, expiresAt: Date.now() + ice.ttl * 1000 };
    clearTimeout(state.iceTimer);
    // Refresh well before expiry, so ICE restarts and new peers always
    // have a valid credential.
    state.iceTimer = setTimeout(refreshIce, Math.max(30, ice.ttl * 0.75) * 1000);
  }

  async function refreshIce() {
    if (state.phase !== 'joined') return;
    try {
      const r = await fetch(`/api/ice?user=${encodeURIComponent(restUser(state.name))}`,
        { cache: 'no-store' });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      setIce(await r.json());
      for (const p of state.peers.values()) {
        try {
          const config = p.pc.getConfiguration();
          config.iceServers = state.ice.iceServers;
          p.pc.setConfiguration(config);
        } catch (e) {
          log(`${p.id}: setConfiguration: ${e}`);
        }
      }
      log('TURN credentials refreshed');
    } catch (e) {
      log(`refreshing TURN credentials failed: ${e}; retrying in 30 s`);
      clearTimeout(state.iceTimer);
      state.iceTimer = setTimeout(refreshIce, 30000);
    }
  }

  // ------------------------------------------------------ peer connections

  // `initiator`: we are the newcomer and this member was already there. The
  // newcomer attaches its media and chat channel at once and so makes the
  // first offer; the member already there attaches its own while answering
  // that offer. Both could start at once (perfect negotiation sorts out the
  // glare), but a first offer from each side with different m-line layouts
  // (say one side has no camera) makes Chromium fail to start SCTP after the
  // rollback. Later renegotiations (ICE restart, a track added) run on
  // perfect negotiation alone.
  function addPeer(id, name, initiator) {
    if (id === state.id) return null;
    const existing = state.peers.get(id);
    if (existing) return existing;
    const pc = new RTCPeerConnection({
      iceServers: state.ice ? state.ice.iceServers : [],
      iceTransportPolicy: state.relayOnly ? 'relay' : 'all',
    });
    const p = {
      id,
      name: typeof name === 'string' && name ? name : 'guest',
      pc,
      // Perfect negotiation: the smaller id is polite (yields on glare).
      polite: state.id < id,
      makingOffer: false,
      ignoreOffer: false,
      settingRemoteAnswerPending: false,
      queue: Promise.resolve(),
      relayOnly: state.relayOnly,
      remoteStream: new MediaStream(),
      videoSender: null,
      attached: false,
      dc: null,
      glares: 0,
      stats: {},
      prevStats: null,
      tile: null,
    };
    state.peers.set(id, p);
    p.tile = makeTile(p);

    pc.onnegotiationneeded = async () => {
      try {
        p.makingOffer = true;
        await pc.setLocalDescription();
        const d = pc.localDescription;
        sendSignal({ type: d.type, to: id, sdp: d.sdp });
      } catch (e) {
        log(`${id}: negotiation failed: ${e}`);
      } finally {
        p.makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && candidate.candidate) {
        sendSignal({ type: 'candidate', to: id, candidate: candidate.toJSON() });
      }
    };
    // Chromium reports one error per local interface that cannot reach a STUN/TURN server; tell
    // the user only while there is no connection, so an unreachable relay is not a silent hang.
    pc.onicecandidateerror = (e) => {
      const what = `${e.url || 'ICE server'}: ${e.errorCode} ${e.errorText || ''}`.trim();
      log(`${id}: ICE candidate error ${what}`);
      if (pc.connectionState !== 'connected') {
        setStatus(`Cannot use ${what}. Check the TURN server address, port and credentials.`, 'error');
      }
    };
    pc.ontrack = ({ track }) => {
      p.remoteStream.addTrack(track);
      track.addEventListener('ended', () => p.remoteStream.removeTrack(track));
      playRemote(p);
    };
    pc.onconnectionstatechange = () => {
      renderState(p);
      if (pc.connectionState === 'failed') {
        log(`${id}: connection failed, restarting ICE`);
        pc.restartIce();
      }
    };
    pc.oniceconnectionstatechange = () => renderState(p);
    pc.onsignalingstatechange = () => renderState(p);
    log(`${id}: peer added (${p.polite ? 'polite' : 'impolite'}, ` +
      `${initiator ? 'we offer first' : 'they offer first'}, ` +
      `${p.relayOnly ? 'relay only' : 'all candidates'})`);
    if (initiator) attachLocal(p);
    return p;
  }

  // Our tracks and the chat channel, once per connection.
  function attachLocal(p) {
    if (p.attached) return;
    p.attached = true;
    const pc = p.pc;
    // One negotiated channel, same id on both sides: glare cannot create two.
    p.dc = pc.createDataChannel('chat', { negotiated: true, id: 0 });
    p.dc.onmessage = (ev) => onChatMessage(p, ev.data);
    p.dc.onopen = () => { log(`${p.id}: chat open`); renderState(p); };
    p.dc.onclose = () => renderState(p);
    if (state.localStream) {
      for (const track of state.localStream.getTracks()) {
        if (track.kind === 'video') {
          p.videoSender = pc.addTrack(state.screenTrack || track, state.localStream);
        } else {
          pc.addTrack(track, state.localStream);
        }
      }
    } else if (state.screenTrack) {
      p.videoSender = pc.addTrack(state.screenTrack, new MediaStream([state.screenTrack]));
    }
  }

  // Messages of one peer are handled strictly in order: a candidate must
  // not overtake the description it belongs to.
  function enqueue(from, job) {
    if (typeof from !== 'string') return;
    const p = state.peers.get(from) || addPeer(from, 'guest', false);
    if (!p) return;
    p.queue = p.queue.then(() => {
      if (state.peers.get(from) !== p) return undefined; // left meanwhile
      return job(p);
    }).catch((e) => log(`${from}: ${e}`));
  }

  async function onDescription(p, description) {
    const pc = p.pc;
    const readyForOffer = !p.makingOffer &&
      (pc.signalingState === 'stable' || p.settingRemoteAnswerPending);
    const offerCollision = description.type === 'offer' && !readyForOffer;
    p.ignoreOffer = !p.polite && offerCollision;
    if (p.ignoreOffer) {
      p.glares += 1;
      log(`${p.id}: glare, ignoring their offer (impolite)`);
      return;
    }
    if (offerCollision) {
      p.glares += 1;
      log(`${p.id}: glare, rolling back our offer (polite)`);
      try {
        await pc.setLocalDescription({ type: 'rollback' });
      } catch (e) {
        // setRemoteDescription below rolls back implicitly.
        log(`${p.id}: explicit rollback: ${e}`);
      }
    }
    p.settingRemoteAnswerPending = description.type === 'answer';
    try {
      await pc.setRemoteDescription(description);
    } finally {
      p.settingRemoteAnswerPending = false;
    }
    if (description.type === 'offer') {
      // Added now, our tracks reuse the transceivers the offer created.
      attachLocal(p);
      await pc.setLocalDescription();
      const d = pc.localDescription;
      sendSignal({ type: d.type, to: p.id, sdp: d.sdp });
    }
  }

  async function onCandidate(p, candidate) {
    if (!candidate || !candidate.candidate) return;
    try {
      await p.pc.addIceCandidate(candidate);
    } catch (e) {
      // Candidates of an offer we ignored (glare) are expected to fail.
      if (!p.ignoreOffer) log(`${p.id}: addIceCandidate: ${e}`);
    }
  }

  function removePeer(id) {
    const p = state.peers.get(id);
    if (!p) return;
    state.peers.delete(id);
    try { p.dc.close(); } catch (_) { /* closed */ }
    p.pc.close();
    p.tile.root.remove();
    log(`${id}: peer removed`);
  }

  function teardownPeers() {
    for (const id of [...state.peers.keys()]) removePeer(id);
  }

  // ------------------------------------------------------------------ tiles

  function makeTile(p) {
    const root = $('tile-template').content.firstElementChild.cloneNode(true);
    root.dataset.peer = p.id;
    const tile = {
      root,
      video: root.querySelector('video'),
      play: root.querySelector('.play'),
      name: root.querySelector('.name'),
      state: root.querySelector('.state'),
      path: root.querySelector('.s-path'),
      local: root.querySelector('.s-local'),
      remote: root.querySelector('.s-remote'),
      rtt: root.querySelector('.s-rtt'),
      in: root.querySelector('.s-in'),
      out: root.querySelector('.s-out'),
    };
    tile.name.textContent = p.name;
    tile.video.srcObject = p.remoteStream;
    tile.play.addEventListener('click', () => {
      tile.video.muted = false;
      tile.video.play().then(() => { tile.play.hidden = true; }, () => { /* still blocked */ });
    });
    $('tiles').append(root);
    return tile;
  }

  // Browsers may refuse to autoplay sound before a click: play muted, and
  // offer a button to unmute.
  function playRemote(p) {
    const video = p.tile.video;
    if (video.srcObject !== p.remoteStream) video.srcObject = p.remoteStream;
    video.play().catch(() => {
      video.muted = true;
      p.tile.play.textContent = 'Click to unmute';
      p.tile.play.hidden = false;
      video.play().catch(() => { p.tile.play.textContent = 'Click to play'; });
    });
  }

  function renderState(p) {
    if (!p.tile) return;
    const pc = p.pc;
    const parts = [pc.connectionState];
    if (pc.signalingState !== 'stable') parts.push(pc.signalingState);
    if (p.dc && p.dc.readyState === 'open') parts.push('chat');
    if (p.relayOnly) parts.push('relay only');
    p.tile.state.textContent = parts.join(' · ');
    p.tile.root.dataset.state = pc.connectionState;
  }

  // ------------------------------------------------------------------ stats

  function startStats() {
    stopStats();
    state.statsTimer = setInterval(async () => {
      if (state.statsBusy) return;
      state.statsBusy = true;
      try {
        await Promise.all([...state.peers.values()].map(collectStats));
      } finally {
        state.statsBusy = false;
      }
    }, STATS_EVERY_MS);
  }

  function stopStats() {
    clearInterval(state.statsTimer);
    state.statsTimer = null;
  }

  function fmtAddr(c) {
    if (!c) return null;
    const ip = c.address || c.ip || '?';
    return `${ip.includes(':') ? `[${ip}]` : ip}:${c.port}`;
  }

  async function collectStats(p) {
    const pc = p.pc;
    if (pc.connectionState === 'closed') return;
    let report;
    try { report = await pc.getStats(); } catch (_) { return; }
    let pair = null;
    report.forEach((s) => {
      if (!pair && s.type === 'transport' && s.selectedCandidatePairId) {
        pair = report.get(s.selectedCandidatePairId) || null;
      }
    });
    if (!pair) {
      report.forEach((s) => {
        if (!pair && s.type === 'candidate-pair' &&
            (s.selected || (s.nominated && s.state === 'succeeded'))) pair = s;
      });
    }
    let rtpIn = 0; let rtpOut = 0; let inStreams = 0; let outStreams = 0;
    report.forEach((s) => {
      if (s.type === 'inbound-rtp') { rtpIn += s.bytesReceived || 0; inStreams += 1; }
      if (s.type === 'outbound-rtp') { rtpOut += s.bytesSent || 0; outStreams += 1; }
    });
    const local = pair ? report.get(pair.localCandidateId) : null;
    const remote = pair ? report.get(pair.remoteCandidateId) : null;
    const pairIn = pair ? pair.bytesReceived || 0 : 0;
    const pairOut = pair ? pair.bytesSent || 0 : 0;
    const now = performance.now();
    const prev = p.prevStats;
    // bytes * 8 / ms = kbit/s
    const kbps = (key, cur) => (prev && now > prev.t
      ? Math.round(Math.max(0, ((cur - prev[key]) * 8) / (now - prev.t))) : 0);
    const rates = {
      rtpIn: kbps('rtpIn', rtpIn),
      rtpOut: kbps('rtpOut', rtpOut),
      pairIn: kbps('pairIn', pairIn),
      pairOut: kbps('pairOut', pairOut),
    };
    const s = {
      connectionState: pc.connectionState,
      iceConnectionState: pc.iceConnectionState,
      signalingState: pc.signalingState,
      dataChannel: p.dc ? p.dc.readyState : 'none',
      localCandidateType: local ? local.candidateType : null,
      remoteCandidateType: remote ? remote.candidateType : null,
      localProtocol: local ? local.protocol : null,
      relayProtocol: local && local.relayProtocol ? local.relayProtocol : null,
      localAddress: fmtAddr(local),
      remoteAddress: fmtAddr(remote),
      viaRelay: !!((local && local.candidateType === 'relay') ||
        (remote && remote.candidateType === 'relay')),
      rttMs: pair && typeof pair.currentRoundTripTime === 'number'
        ? Math.round(pair.currentRoundTripTime * 10000) / 10 : null,
      // Media (RTP) bitrate in each direction; where no media stream goes
      // that way, everything on the selected pair (data channel, RTCP).
      inKbps: inStreams ? rates.rtpIn : rates.pairIn,
      outKbps: outStreams ? rates.rtpOut : rates.pairOut,
      mediaIn: inStreams > 0,
      mediaOut: outStreams > 0,
      pairInKbps: rates.pairIn,
      pairOutKbps: rates.pairOut,
      bytesIn: rtpIn,
      bytesOut: rtpOut,
      pairBytesIn: pairIn,
      pairBytesOut: pairOut,
      remoteTracks: p.remoteStream.getTracks().length,
      at: Date.now(),
    };
    p.prevStats = { t: now, rtpIn, rtpOut, pairIn, pairOut };
    p.stats = s;
    renderStats(p);
  }

  function renderStats(p) {
    const s = p.stats;
    const t = p.tile;
    if (s.localCandidateType) {
      t.path.textContent = `${s.localCandidateType} ↔ ${s.remoteCandidateType}` +
        (s.viaRelay ? ' (via TURN)' : '');
      t.local.textContent = `${s.localAddress} ${s.localProtocol || ''}` +
        (s.relayProtocol ? ` relay/${s.relayProtocol}` : '');
      t.remote.textContent = s.remoteAddress || '–';
    } else {
      t.path.textContent = 'no path yet';
      t.local.textContent = '–';
      t.remote.textContent = '–';
    }
    t.rtt.textContent = s.rttMs === null ? '–' : `${s.rttMs} ms`;
    t.in.textContent = `${s.inKbps} kbit/s${s.mediaIn ? '' : ' (no media)'}`;
    t.out.textContent = `${s.outKbps} kbit/s${s.mediaOut ? '' : ' (no media)'}`;
    t.root.classList.toggle('relayed', s.viaRelay);
    renderState(p);
  }

  // ------------------------------------------------------------------- chat

  function sendChat(raw) {
    const text = String(raw == null ? '' : raw).trim().slice(0, MAX_CHAT);
    if (!text) return null;
    const payload = JSON.stringify({ kind: 'chat', text });
    let sent = 0;
    for (const p of state.peers.values()) {
      if (p.dc && p.dc.readyState === 'open') {
        try { p.dc.send(payload); sent += 1; } catch (e) { log(`${p.id}: chat send: ${e}`); }
      }
    }
    addChat({ from: state.id, name: state.name, text, self: true });
    return sent;
  }

  function onChatMessage(p, data) {
    if (typeof data !== 'string' || data.length > 4 * MAX_CHAT) return;
    let msg;
    try { msg = JSON.parse(data); } catch (_) { return; }
    if (!msg || msg.kind !== 'chat' || typeof msg.text !== 'string') return;
    // The name is the one the server announced, not one the sender claims.
    addChat({ from: p.id, name: p.name, text: msg.text.slice(0, MAX_CHAT) });
  }

  function addChat(entry) {
    const item = { at: Date.now(), from: null, name: '', self: false, system: false, ...entry };
    state.chat.push(item);
    if (state.chat.length > MAX_LOG) state.chat.shift();
    const li = document.createElement('li');
    if (item.system) {
      li.className = 'system';
      li.textContent = item.text;
    } else {
      if (item.self) li.className = 'self';
      const who = document.createElement('b');
      who.textContent = item.self ? 'you' : item.name;
      li.append(who, document.createTextNode(` ${item.text}`));
    }
    const list = $('chat-log');
    list.append(li);
    while (list.children.length > MAX_LOG) list.firstElementChild.remove();
    list.scrollTop = list.scrollHeight;
  }

  // ------------------------------------------------------------- test hook

  window.turnpikeTest = {
    join: () => join(),
    leave: () => leave(),
    reconnect: () => reconnect(),
    waitJoined: () => waitJoined(),
    id: () => state.id,
    room: () => state.room,
    name: () => state.name,
    phase: () => state.phase,
    peers: () => [...state.peers.values()].map((p) => ({
      id: p.id,
      name: p.name,
      polite: p.polite,
      connectionState: p.pc.connectionState,
      iceConnectionState: p.pc.iceConnectionState,
      signalingState: p.pc.signalingState,
      dataChannel: p.dc ? p.dc.readyState : 'none',
      remoteTracks: p.remoteStream.getTracks().map((t) => t.kind),
      relayOnly: p.relayOnly,
      glares: p.glares,
    })),
    stats: () => Object.fromEntries([...state.peers.values()].map((p) => [p.id, { ...p.stats }])),
    sendChat: (text) => sendChat(text),
    chat: () => state.chat.map((m) => ({ ...m })),
    errors: () => state.errors.map((e) => ({ ...e })),
    log: () => state.log.slice(),
    relayOnly: () => state.relayOnly,
    setRelayOnly: (on) => setRelayOnly(on),
    mute: (on) => toggleMute(on),
    cameraOff: (on) => toggleCamera(on),
    share: (track) => toggleShare(track),
    // Renegotiates every connection (ICE restart): run it on two pages at
    // once to provoke glare.
    restartIce: () => {
      for (const p of state.peers.values()) p.pc.restartIce();
      return state.peers.size;
    },
    media: () => ({
      tracks: state.localStream ? state.localStream.getTracks().map((t) => t.kind) : [],
      micMuted: state.micMuted,
      cameraOff: state.cameraOff,
      sharing: !!state.screenTrack,
    }),
    iceServers: () => (state.ice ? state.ice.iceServers.map((s) => ({
      urls: [].concat(s.urls),
      username: s.username || null,
    })) : []),
  };

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', init);
  } else {
    init();
  }
})();
