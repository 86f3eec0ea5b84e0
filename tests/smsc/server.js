#!/usr/bin/env node
// SMSC simulator for the sms-milter dispatcher tests (npm `smpp` 0.5.1).
//
// Usage: node server.js [--port N] [--system-id gw] [--password pw] [--log FILE] [options]
// Prints "LISTENING <port>" on stdout once it accepts connections (--port 0 = any free port).
//
// Options (each may also be changed at run time by a JSON line on stdin, e.g.
// {"throttle": 5} or {"drop_after": 3}; keys are the option names with '_' for '-'):
//   --hex-ids            message ids in submit_sm_resp in hex, in receipts in decimal
//   --receipt-mode M     tlv (TLVs + text, default) | text (receipt text only)
//   --receipt-delay MS   wait before sending each receipt (default 0)
//   --receipt-first      send the receipt BEFORE the submit_sm_resp (the race a client must survive)
//   --resp-delay MS      wait before sending each submit_sm_resp (with --receipt-first: the client
//                        surely has the receipt long before it can store the message id)
//   --stale-receipts N   on the next bind, first send N receipts for message ids never issued (a
//                        backlog of stale receipts, as an SMSC resends after an outage)
//   --no-receipts        never send receipts (with --enroute: only the ENROUTE one, never the final one)
//   --enroute            send an ENROUTE receipt before the final one
//   --throttle N         answer ESME_RTHROTTLED (0x58) to the next N submits
//   --throttle-session K only submits of session K (the Kth connection, 1-based) are throttled
//   --throttle-every N   every Nth submit starts a throttling episode: it and every submit after it
//                        get ESME_RTHROTTLED until none has come for --throttle-quiet MS (default
//                        100): an SMSC that refuses a client until it backs off
//   --max-binds N        at most N sessions bound at once per system_id: one more bind gets
//                        ESME_RBINDFAIL (0x0D) and is closed (an SMSC's session limit)
//   --qfull N            answer ESME_RMSGQFUL (0x14) to the next N submits
//   --syserr N           answer ESME_RSYSERR (0x08, temporary) to the next N submits
//   --fail-dest A,B      answer ESME_RINVDSTADR (0x0B, permanent) for these destination_addr
//   --undeliv A,B        final receipt stat UNDELIV for these destination_addr
//   --expired-dest A,B   final receipt stat EXPIRED for these destination_addr
//   --drop-after N       after the next N submits are answered, drop the connection once (the
//                        N+1st submit and everything after it in that read gets no answer)
//   --flap N             every session: after N submits answered (0: none), the next one gets no
//                        answer and the connection is dropped (a flapping SMSC: on every reconnect)
//   --no-unbind-resp     never answer unbind (a rude SMSC)
//   --first-id N         message ids start at N (decimal) instead of a time-based value: a
//                        restarted simulator hands out the same ids again, as real SMSCs do
//   --silent             never answer submit_sm (enquire_link is still answered): a silent SMSC
//   --close-after-bind   close every connection right after answering its bind (a reconnect storm)
//   --query-sm           answer query_sm with the message's state (DELIVRD, or UNDELIV/EXPIRED as
//                        --undeliv/--expired-dest say); without it query_sm gets ESME_RQUERYFAIL
// Control lines also take {"command": "receipt", "id": "1", "dest": "41790000000", "stat": "DELIVRD"}:
// send that receipt now (e.g. a stale one for an id that was reused).
// Every PDU received is logged as one JSON line to --log (or nowhere): submit_sm lines carry
// the exact octets (short_message_hex, udh_hex), data_coding, esm_class, TON/NPI and
// registered_delivery, parsed from the raw PDU, not from the library's decoded view.
// Receipts not acknowledged with deliver_sm_resp ROK are sent again on the next bind of the
// same system_id, like a store-and-forward SMSC.
'use strict';

const fs = require('fs');
const readline = require('readline');
const smpp = require('smpp');
const { PDU } = require('smpp/lib/pdu');

// Keep the raw bytes of every parsed PDU (the library only keeps its decoded view).
const origFromBuffer = PDU.prototype.fromBuffer;
PDU.prototype.fromBuffer = function (buffer) {
  this._raw = Buffer.from(buffer);
  return origFromBuffer.call(this, buffer);
};

function parseArgs(argv) {
  const o = {
    port: Number(process.env.SMSC_PORT || 2775), system_id: 'gw', password: 'pw', log: '',
    hex_ids: false, receipt_mode: 'tlv', receipt_delay: 0, receipt_first: false, no_receipts: false,
    resp_delay: 0, stale_receipts: 0,
    enroute: false, throttle: 0, qfull: 0, syserr: 0, fail_dest: [], undeliv: [], expired_dest: [],
    drop_after: -1, no_unbind_resp: false, first_id: 0, silent: false, close_after_bind: false,
    query_sm: false, throttle_session: 0, max_binds: 0, throttle_every: 0, throttle_quiet: 100, flap: -1,
  };
  const lists = new Set(['fail_dest', 'undeliv', 'expired_dest']);
  for (let i = 2; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, '').replace(/-/g, '_');
    if (!(key in o)) throw new Error('unknown option ' + argv[i]);
    if (typeof o[key] === 'boolean') { o[key] = true; continue; }
    const v = argv[++i];
    if (lists.has(key)) o[key] = v ? v.split(',') : [];
    else if (typeof o[key] === 'number') o[key] = Number(v);
    else o[key] = v;
  }
  return o;
}

const opt = parseArgs(process.argv);
// Written synchronously, before the PDU's answer goes out: whatever a client saw is in the log
// (a stream flushed later; tests read the log as soon as the dispatcher had its answer).
const logFd = opt.log ? fs.openSync(opt.log, 'a') : null;
function record(obj) {
  if (logFd !== null) fs.writeSync(logFd, JSON.stringify(obj) + '\n');
}

// Message ids: unique across restarts of the simulator; hex and decimal forms never have the
// same length (so they cannot be mistaken for one another).
let nextId = opt.first_id > 0 ? opt.first_id : Math.floor(Date.now() / 1000) * 100000;
const issued = new Map(); // wire message id -> final stat word (for query_sm)
const counts = { submits: 0, throttled: 0, episodes: 0 }; // for {"command": "stats"}
let episodeLast = 0; // time of the last submit in a throttling episode (0: none)
const pendingReceipts = new Map(); // system_id -> Map(key -> receipt options)
const bound = new Map(); // system_id -> Set(session)
let sessionSeq = 0;

function cstr(buf, pos) {
  const end = buf.indexOf(0, pos);
  return [buf.toString('latin1', pos, end), end + 1];
}

// submit_sm body parsed straight from the octets.
function parseSubmit(raw) {
  let p = 16;
  const f = {};
  [f.service_type, p] = cstr(raw, p);
  f.source_addr_ton = raw[p++]; f.source_addr_npi = raw[p++];
  [f.source_addr, p] = cstr(raw, p);
  f.dest_addr_ton = raw[p++]; f.dest_addr_npi = raw[p++];
  [f.destination_addr, p] = cstr(raw, p);
  f.esm_class = raw[p++]; f.protocol_id = raw[p++]; f.priority_flag = raw[p++];
  [f.schedule_delivery_time, p] = cstr(raw, p);
  [f.validity_period, p] = cstr(raw, p);
  f.registered_delivery = raw[p++]; f.replace_if_present_flag = raw[p++];
  f.data_coding = raw[p++]; f.sm_default_msg_id = raw[p++];
  const len = raw[p++];
  const sm = raw.subarray(p, p + len);
  p += len;
  let udh = Buffer.alloc(0);
  let body = sm;
  if (f.esm_class & 0x40 && sm.length > 0) {
    udh = sm.subarray(0, sm[0] + 1);
    body = sm.subarray(sm[0] + 1);
  }
  f.short_message_hex = sm.toString('hex');
  f.udh_hex = udh.toString('hex');
  f.body_hex = body.toString('hex');
  f.tlvs = {};
  while (p + 4 <= raw.length) {
    const tag = raw.readUInt16BE(p); const l = raw.readUInt16BE(p + 2);
    f.tlvs[tag.toString(16)] = raw.subarray(p + 4, p + 4 + l).toString('hex');
    p += 4 + l;
  }
  return f;
}

function ts(d) {
  const z = (n) => String(n).padStart(2, '0');
  return z(d.getUTCFullYear() % 100) + z(d.getUTCMonth() + 1) + z(d.getUTCDate()) + z(d.getUTCHours()) + z(d.getUTCMinutes());
}

const STATES = { ENROUTE: 1, DELIVRD: 2, EXPIRED: 3, DELETED: 4, UNDELIV: 5, ACCEPTD: 6, UNKNOWN: 7, REJECTD: 8 };

function receiptFor(sub, id, stat) {
  const rid = String(id); // decimal in receipts (hex in submit_sm_resp with --hex-ids)
  const now = new Date();
  const text = 'id:' + rid + ' sub:001 dlvrd:' + (stat === 'DELIVRD' ? '001' : '000') + ' submit date:' + ts(now) +
    ' done date:' + ts(now) + ' stat:' + stat + ' err:' + (stat === 'DELIVRD' ? '000' : '001') + ' text:' +
    Buffer.from(sub.body_hex, 'hex').toString('latin1').replace(/[^\x20-\x7e]/g, '.').slice(0, 20);
  const o = {
    source_addr_ton: sub.dest_addr_ton, source_addr_npi: sub.dest_addr_npi, source_addr: sub.destination_addr,
    dest_addr_ton: sub.source_addr_ton, dest_addr_npi: sub.source_addr_npi,
    destination_addr: sub.source_addr, esm_class: 0x04, data_coding: 0, short_message: Buffer.from(text, 'latin1'),
  };
  if (opt.receipt_mode === 'tlv') {
    o.receipted_message_id = rid;
    o.message_state = STATES[stat];
  }
  return { key: rid + ':' + stat, opts: o, stat, id: rid };
}

function sendReceipt(systemId, rc) {
  let pend = pendingReceipts.get(systemId);
  if (!pend) pendingReceipts.set(systemId, (pend = new Map()));
  pend.set(rc.key, rc);
  const sessions = bound.get(systemId);
  if (!sessions || sessions.size === 0) return; // sent on the next bind
  const s = sessions.values().next().value;
  deliver(s, systemId, rc);
}

function deliver(session, systemId, rc) {
  const pdu = new PDU('deliver_sm', Object.assign({}, rc.opts));
  const ok = session.send(pdu, (resp) => {
    record({ t: Date.now(), session: session.num, command: 'deliver_sm_resp', status: resp.command_status, receipt: rc.id, stat: rc.stat });
    if (resp.command_status === 0) {
      const pend = pendingReceipts.get(systemId);
      if (pend) pend.delete(rc.key);
    }
  });
  if (ok) record({ t: Date.now(), session: session.num, command: 'deliver_sm_sent', receipt: rc.id, stat: rc.stat });
}

function finalStat(dest) {
  if (opt.undeliv.includes(dest)) return 'UNDELIV';
  if (opt.expired_dest.includes(dest)) return 'EXPIRED';
  return 'DELIVRD';
}

function scheduleReceipts(systemId, sub, id) {
  if (opt.no_receipts) {
    if (opt.enroute) sendReceipt(systemId, receiptFor(sub, id, 'ENROUTE')); // the final one never comes
    return;
  }
  const stat = finalStat(sub.destination_addr);
  const fire = () => {
    if (opt.enroute) sendReceipt(systemId, receiptFor(sub, id, 'ENROUTE'));
    sendReceipt(systemId, receiptFor(sub, id, stat));
  };
  if (opt.receipt_delay > 0) setTimeout(fire, opt.receipt_delay);
  else fire();
}

const server = smpp.createServer((session) => {
  session.num = ++sessionSeq;
  let systemId = null;
  let dropping = false;
  let answered = 0;  // submits answered in this session (--flap)
  record({ t: Date.now(), session: session.num, command: 'connect' });
  session.on('error', () => {});
  session.on('close', () => {
    record({ t: Date.now(), session: session.num, command: 'close' });
    if (systemId && bound.get(systemId)) bound.get(systemId).delete(session);
  });
  session.on('bind_transceiver', (pdu) => {
    const sid = String(pdu.system_id); const pw = String(pdu.password);
    record({ t: Date.now(), session: session.num, command: 'bind_transceiver', system_id: sid, system_type: String(pdu.system_type || '') });
    if (sid !== opt.system_id || pw !== opt.password) {
      session.send(pdu.response({ command_status: sid !== opt.system_id ? smpp.ESME_RINVSYSID : smpp.ESME_RINVPASWD }));
      session.close();
      return;
    }
    if (opt.max_binds > 0 && bound.has(sid) && bound.get(sid).size >= opt.max_binds) {
      record({ t: Date.now(), session: session.num, command: 'bind_refused', status: smpp.ESME_RBINDFAIL });
      session.send(pdu.response({ command_status: smpp.ESME_RBINDFAIL }));
      session.close();
      return;
    }
    systemId = sid;
    if (!bound.has(sid)) bound.set(sid, new Set());
    bound.get(sid).add(session);
    session.send(pdu.response({ system_id: 'SIMSMSC' }));
    if (opt.close_after_bind) {
      session.close();
      return;
    }
    if (opt.stale_receipts > 0) {
      // Ids from a range submit_sm_resp never uses (9e14.., 15 digits), in either form.
      const stale = { dest_addr_ton: 1, dest_addr_npi: 1, destination_addr: '41790000000', source_addr_ton: 1,
        source_addr_npi: 1, source_addr: '41760000000', body_hex: Buffer.from('stale').toString('hex') };
      let pend = pendingReceipts.get(sid);
      if (!pend) pendingReceipts.set(sid, (pend = new Map()));
      for (let k = 0; k < opt.stale_receipts; k++) {
        const rc = receiptFor(stale, 900000000000000 + k, 'DELIVRD');
        pend.set(rc.key, rc);
      }
      opt.stale_receipts = 0;
    }
    const pend = pendingReceipts.get(sid);
    if (pend) for (const rc of Array.from(pend.values())) deliver(session, sid, rc);
  });
  session.on('enquire_link', (pdu) => {
    record({ t: Date.now(), session: session.num, command: 'enquire_link' });
    session.send(pdu.response());
  });
  session.on('unbind', (pdu) => {
    record({ t: Date.now(), session: session.num, command: 'unbind' });
    if (opt.no_unbind_resp) return;
    session.send(pdu.response());
    session.close();
  });
  session.on('query_sm', (pdu) => {
    const mid = String(pdu.message_id);
    const stat = issued.get(mid);
    const rec = { t: Date.now(), session: session.num, command: 'query_sm', message_id: mid };
    if (!opt.query_sm || stat === undefined) {
      record(Object.assign(rec, { status: smpp.ESME_RQUERYFAIL }));
      session.send(pdu.response({ command_status: smpp.ESME_RQUERYFAIL }));
      return;
    }
    record(Object.assign(rec, { status: 0, stat }));
    session.send(pdu.response({ message_id: mid, final_date: '', message_state: STATES[stat], error_code: 0 }));
  });
  session.on('submit_sm', (pdu) => {
    if (dropping) return;
    const sub = parseSubmit(pdu._raw);
    const rec = Object.assign({ t: Date.now(), session: session.num, command: 'submit_sm', seq: pdu.sequence_number }, sub);
    if (opt.silent) {
      record(Object.assign(rec, { unanswered: true }));
      return;
    }
    if (systemId === null) {
      record(Object.assign(rec, { status: smpp.ESME_RINVBNDSTS }));
      session.send(pdu.response({ command_status: smpp.ESME_RINVBNDSTS }));
      return;
    }
    if (opt.drop_after === 0) {
      opt.drop_after = -1;
      dropping = true;
      record(Object.assign(rec, { dropped: true }));
      session.destroy();
      return;
    }
    if (opt.drop_after > 0) opt.drop_after--;
    if (opt.flap >= 0 && answered >= opt.flap) {
      dropping = true;
      record(Object.assign(rec, { dropped: true }));
      session.destroy();
      return;
    }
    answered++;
    let status = 0;
    counts.submits++;
    const now = Date.now();
    if (episodeLast && now - episodeLast >= opt.throttle_quiet) episodeLast = 0; // the client backed off
    if (!episodeLast && opt.throttle_every > 0 && counts.submits % opt.throttle_every === 0) {
      episodeLast = now; counts.episodes++;
    }
    if (episodeLast) {
      episodeLast = now; counts.throttled++; status = smpp.ESME_RTHROTTLED;
    }
    else if (opt.throttle > 0 && (!opt.throttle_session || opt.throttle_session === session.num)) {
      opt.throttle--; status = smpp.ESME_RTHROTTLED; counts.throttled++;
    }
    else if (opt.qfull > 0) { opt.qfull--; status = smpp.ESME_RMSGQFUL; }
    else if (opt.syserr > 0) { opt.syserr--; status = smpp.ESME_RSYSERR; }
    else if (opt.fail_dest.includes(sub.destination_addr)) status = smpp.ESME_RINVDSTADR;
    rec.status = status;
    if (status !== 0) {
      record(rec);
      session.send(pdu.response({ command_status: status }));
      return;
    }
    const id = nextId++;
    const wireId = opt.hex_ids ? id.toString(16) : String(id);
    rec.message_id = wireId;
    issued.set(wireId, finalStat(sub.destination_addr));
    record(rec);
    const respond = () => session.send(pdu.response({ message_id: wireId }));
    if (opt.receipt_first) {
      scheduleReceipts(systemId, sub, id);
      if (opt.resp_delay > 0) setTimeout(respond, opt.resp_delay);
      else respond();
    } else {
      if (opt.resp_delay > 0) {
        setTimeout(() => { respond(); scheduleReceipts(systemId, sub, id); }, opt.resp_delay);
      } else {
        respond();
        scheduleReceipts(systemId, sub, id);
      }
    }
  });
});

server.on('error', (e) => { console.error('smsc: ' + e.message); process.exit(1); });
server.listen(opt.port, '127.0.0.1', () => {
  process.stdout.write('LISTENING ' + server.address().port + '\n');
});

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (!line.trim()) return;
  try {
    const change = JSON.parse(line);
    if (change.command === 'stats') {
      let pend = 0;
      for (const m of pendingReceipts.values()) pend += m.size;
      process.stdout.write('STATS ' + JSON.stringify(Object.assign({ pending_receipts: pend, next_id: nextId },
        counts)) + '\n');
      return;
    }
    if (change.command === 'receipt') {
      const sub = { dest_addr_ton: 1, dest_addr_npi: 1, destination_addr: String(change.dest), source_addr_ton: 1,
        source_addr_npi: 1, source_addr: '41760000000', body_hex: '' };
      const rc = receiptFor(sub, change.id, change.stat || 'DELIVRD');
      rc.key += ':' + Date.now(); // a resend, not the same pending entry
      sendReceipt(opt.system_id, rc);
      process.stdout.write('OK\n');
      return;
    }
    if (change.command === 'drop') {
      for (const s of server.sessions.slice()) s.destroy();
      process.stdout.write('OK\n');
      return;
    }
    Object.assign(opt, change);
    process.stdout.write('OK\n');
  } catch (e) {
    process.stdout.write('ERR ' + e.message + '\n');
  }
});
process.on('SIGTERM', () => process.exit(0));
