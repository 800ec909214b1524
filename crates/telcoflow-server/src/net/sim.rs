//! Server side of the simulated phone network: the `/v1/sim/phone` endpoint.
//!
//! A dialling phone becomes the caller leg of a new call routed to a connector like any
//! incoming call. A registered phone sits in the [`Directory`] and becomes the destination leg
//! when `call.connect` rings its number.
//!
//! Phones send and receive s16le PCM; legs carry samples, so each phone's task converts at its
//! WebSocket, with pools that make a frame cost no allocation ([`Pools`]).
//!
//! Admission: the endpoint is off unless `[sim] enabled` (the development configuration turns
//! it on). Only the development configuration on a loopback listener takes phones without
//! credentials; anywhere else a phone authenticates as a connector, with the control plane's
//! headers, with `?api_key=&connector_uuid=` in the query, or, for browsers, in its first
//! frame after connecting with `?auth=frame` (an `AuthFrame`, which keeps the key out of
//! URLs and logs), and may then dial and register only that connector's numbers
//! ([`Admission`], decided by `auth::admit_phone`).

use super::{AddressKind, Network, RingError};
use crate::call::{
    self, CallHandle, CallInput, LegEvent, LegId, LegKind, LegLink, LegOutput, Refusal, SamplePool,
    frame_bytes,
};
use crate::config::{ConnectorConfig, check_address};
use crate::state::Shared;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use telcoflow_proto::ErrorCode;
use telcoflow_proto::SampleRate;
use telcoflow_proto::pool::FramePool;
use telcoflow_proto::sim::{AuthFrame, HangupReason, NetworkFrame, PhoneFrame};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span};

/// How long a phone has to say what it wants after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards one phone (a second of audio).
const PHONE_QUEUE: usize = 64;
/// Largest frame a phone may send: a second of 24 kHz PCM.
const MAX_PHONE_FRAME: usize = 64 * 1024;

/// Frame storage of one phone's task, for converting audio at its WebSocket.
#[derive(Debug, Default)]
struct Pools {
    /// Samples of the phone's PCM, to its call.
    to_call: SamplePool,
    /// PCM of its call's samples, to the phone.
    to_phone: FramePool,
}

/// A ring for a registered phone.
#[derive(Debug)]
pub(crate) struct RingRequest {
    call: CallHandle,
    leg: LegId,
    /// What this call sends the phone. Each ring has its own channel, so that a late output
    /// of one call can never be taken for another's.
    outputs: mpsc::Receiver<LegOutput>,
}

#[derive(Debug)]
struct RegisteredPhone {
    conn_id: u64,
    rate: SampleRate,
    rings: mpsc::Sender<RingRequest>,
}

/// Registered simulated phones by number.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    phones: Mutex<HashMap<String, RegisteredPhone>>,
}

impl Directory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RegisteredPhone>> {
        // Only plain map operations happen under this lock; a poisoned map is still consistent.
        self.phones.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Network for Directory {
    fn serves(&self) -> AddressKind {
        AddressKind::Number
    }

    /// Rings the phone at `number` for `call`; the phone's answer arrives as a leg event.
    fn ring(&self, number: &str, call: &CallHandle, leg: LegId) -> Result<LegLink, RingError> {
        let phones = self.lock();
        let phone = phones.get(number).ok_or(RingError::NotRegistered)?;
        let (tx, outputs) = mpsc::channel(PHONE_QUEUE);
        phone
            .rings
            .try_send(RingRequest {
                call: call.clone(),
                leg,
                outputs,
            })
            .map_err(|_| RingError::Busy)?;
        Ok(LegLink {
            rate: phone.rate,
            tx,
            kind: LegKind::Sim,
            quality: None,
        })
    }
}

/// What the `/v1/sim/phone` endpoint works with: the server, and the phones registered.
#[derive(Debug, Clone)]
pub(crate) struct SimState {
    pub(crate) shared: Arc<Shared>,
    pub(crate) phones: Arc<Directory>,
}

/// Who a phone is, and so which numbers it may use.
#[derive(Debug, Clone)]
pub(crate) enum Admission {
    /// Development on loopback without credentials: any number.
    Open,
    /// Authenticated as this connector: its numbers only.
    Connector(Arc<ConnectorConfig>),
    /// To authenticate in its first frame (`?auth=frame`), then as [`Self::Connector`].
    InFrame,
}

impl Admission {
    /// Whether this phone may dial `to`: it must be routed to its connector.
    fn may_dial(&self, shared: &Shared, to: &str) -> bool {
        match self {
            Self::Open => true,
            Self::InFrame => false,
            Self::Connector(c) => shared.route(to).is_some_and(|r| r.uuid == c.uuid),
        }
    }

    /// Whether this phone may register at `number`: one its connector owns (see [`owns`]).
    fn may_register(&self, shared: &Shared, number: &str) -> bool {
        match self {
            Self::Open => true,
            Self::InFrame => false,
            Self::Connector(c) => {
                owns(c, number)
                    || (c.numbers.iter().any(|n| n == "*")
                        && !shared
                            .config
                            .connectors
                            .iter()
                            .any(|other| other.uuid != c.uuid && owns(other, number)))
            }
        }
    }
}

/// The numbers a connector owns: those routed to it, its `call.connect` destinations, the
/// exact addresses among its `transfer_targets` (a pattern owns nothing) and its outbound
/// caller id. A `"*"` connector also owns every number no other connector lists.
fn owns(c: &ConnectorConfig, number: &str) -> bool {
    c.numbers.iter().any(|n| n == number)
        || c.connect.values().any(|d| d == number)
        || c.connect_default.as_deref() == Some(number)
        || c.transfer_targets
            .iter()
            .any(|t| t == number && !t.ends_with('*'))
        || c.outbound_caller_id.as_deref() == Some(number)
}

/// Upgrades an admitted phone (`GET /v1/sim/phone`; `http::sim_phone` decides the admission).
pub(crate) fn upgrade(
    SimState { shared, phones }: SimState,
    ws: WebSocketUpgrade,
    admission: Admission,
) -> Response {
    let token = shared.tasks.token();
    ws.max_message_size(MAX_PHONE_FRAME)
        .max_frame_size(MAX_PHONE_FRAME)
        .read_buffer_size(crate::WS_READ_BUFFER)
        .on_upgrade(move |socket| async move {
            let conn_id = shared.next_conn_id();
            run_phone(shared, phones, socket, conn_id, admission)
                .instrument(info_span!("phone", conn_id))
                .await;
            drop(token);
        })
}

async fn send(socket: &mut WebSocket, frame: NetworkFrame) -> bool {
    socket
        .send(Message::Text(frame.encode().into()))
        .await
        .is_ok()
}

/// Tells a phone whose frame was over the size limit why it is being closed (1009).
async fn close_if_too_big(socket: &mut WebSocket, error: &axum::Error) {
    if let Some(close) = crate::close_for_receive_error(error, "the simulated phone's limit") {
        let _ = socket.send(Message::Close(Some(close))).await;
    }
}

/// The next text frame, within [`HELLO_TIMEOUT`]; `None` (the phone told why, if it can be
/// told) when anything else comes.
async fn first_text(shared: &Shared, socket: &mut WebSocket, what: &str) -> Option<String> {
    let first = tokio::select! {
        r = tokio::time::timeout(HELLO_TIMEOUT, socket.recv()) => r,
        () = shared.shutdown.cancelled() => return None,
    };
    match first {
        Ok(Some(Ok(Message::Text(text)))) => Some(text.as_str().to_owned()),
        Ok(Some(Ok(_))) => {
            let message = format!("the first frame must be a text {what} frame");
            send(socket, NetworkFrame::Error { message }).await;
            None
        }
        Ok(Some(Err(e))) => {
            close_if_too_big(socket, &e).await;
            None
        }
        _ => None,
    }
}

/// Authenticates a phone that connected with `?auth=frame` by its first frame; a refusal is
/// an error frame and a close with code 1008 and the reason.
async fn authenticate_in_frame(
    shared: &Shared,
    socket: &mut WebSocket,
) -> Option<Arc<ConnectorConfig>> {
    let text = first_text(shared, socket, "auth").await?;
    let refused = match AuthFrame::decode(&text) {
        Ok(auth) => match shared.check_key(&auth.connector_uuid, &auth.api_key) {
            Some(connector) => return Some(connector),
            None => "unknown connector or wrong API key".to_owned(),
        },
        Err(e) => format!(
            "the first frame must be {{\"type\":\"auth\",\"connectorUuid\",\"apiKey\"}}: {e}"
        ),
    };
    debug!(reason = %refused, "simulated phone refused");
    send(
        socket,
        NetworkFrame::Error {
            message: refused.clone(),
        },
    )
    .await;
    let close = axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::POLICY,
        reason: crate::close_reason(&refused).into(),
    };
    let _ = socket.send(Message::Close(Some(close))).await;
    None
}

async fn run_phone(
    shared: Arc<Shared>,
    phones: Arc<Directory>,
    mut socket: WebSocket,
    conn_id: u64,
    mut admission: Admission,
) {
    if matches!(admission, Admission::InFrame) {
        match authenticate_in_frame(&shared, &mut socket).await {
            Some(connector) => admission = Admission::Connector(connector),
            None => return,
        }
    }
    let Some(hello) = first_text(&shared, &mut socket, "dial or register").await else {
        return;
    };
    let hello = PhoneFrame::decode(&hello);
    match hello {
        Ok(PhoneFrame::Dial {
            from,
            to,
            sample_rate,
        }) => {
            let refused = check_address("from", &from)
                .and_then(|()| check_address("to", &to))
                .err()
                .or_else(|| {
                    (!admission.may_dial(&shared, &to)).then(|| {
                        format!("{to} is not a number of the connector this phone authenticated as")
                    })
                });
            match refused {
                Some(message) => {
                    send(&mut socket, NetworkFrame::Error { message }).await;
                }
                None => dial(shared, socket, from, to, sample_rate).await,
            }
        }
        Ok(PhoneFrame::Register {
            number,
            sample_rate,
        }) => {
            let refused = check_address("number", &number).err().or_else(|| {
                (!admission.may_register(&shared, &number)).then(|| {
                    format!("{number} is not a number of the connector this phone authenticated as")
                })
            });
            match refused {
                Some(message) => {
                    send(&mut socket, NetworkFrame::Error { message }).await;
                }
                None => register(shared, &phones, socket, conn_id, number, sample_rate).await,
            }
        }
        Ok(other) => {
            let message = format!("expected dial or register first, got {other:?}");
            send(&mut socket, NetworkFrame::Error { message }).await;
        }
        Err(e) => {
            send(
                &mut socket,
                NetworkFrame::Error {
                    message: e.to_string(),
                },
            )
            .await;
        }
    }
}

async fn dial(
    shared: Arc<Shared>,
    mut socket: WebSocket,
    from: String,
    to: String,
    rate: SampleRate,
) {
    let (leg_tx, mut leg_rx) = mpsc::channel(PHONE_QUEUE);
    let started = match shared.route(&to) {
        // Checked before the route, so that the phone learns why whatever it dialled.
        _ if shared.is_draining() => Err(HangupReason::Unavailable),
        None => Err(HangupReason::NotFound),
        Some(connector) => {
            let caller = LegLink {
                rate,
                tx: leg_tx,
                kind: LegKind::Sim,
                quality: None,
            };
            call::spawn_incoming(&shared, connector, &from, &to, caller).map_err(|code| {
                if code == ErrorCode::QuotaExceeded {
                    HangupReason::Busy
                } else {
                    HangupReason::Error
                }
            })
        }
    };
    let call = match started {
        Ok(call) => call,
        Err(reason) => {
            debug!(%to, ?reason, "call refused");
            let hangup = NetworkFrame::Hangup {
                call_id: None,
                reason,
            };
            send(&mut socket, hangup).await;
            return;
        }
    };
    let call_id = call.call_id.to_string();
    let mut pools = Pools::default();
    if !send(
        &mut socket,
        NetworkFrame::Trying {
            call_id: call_id.clone(),
        },
    )
    .await
    {
        call.send_data(leg_input(LegId::CALLER, LegEvent::Hangup))
            .await;
        return;
    }
    loop {
        tokio::select! {
            // Cancel-safe: WebSocket::recv is a stream poll.
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(pcm))) => {
                    let samples = pools.to_call.frame_from_pcm(&pcm);
                    call.send_data(leg_input(LegId::CALLER, LegEvent::Audio(samples))).await;
                }
                Some(Ok(Message::Text(text))) => match PhoneFrame::decode(&text) {
                    Ok(PhoneFrame::Hangup) => {
                        call.send_data(leg_input(LegId::CALLER, LegEvent::Hangup)).await;
                    }
                    Ok(PhoneFrame::Dtmf { digit, duration_ms }) => {
                        call.send_data(leg_input(LegId::CALLER, LegEvent::Dtmf { digit, duration_ms })).await;
                    }
                    Ok(other) => {
                        let message = format!("{other:?} is not valid for a dialling phone");
                        send(&mut socket, NetworkFrame::Error { message }).await;
                    }
                    Err(e) => {
                        send(&mut socket, NetworkFrame::Error { message: e.to_string() }).await;
                    }
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    close_if_too_big(&mut socket, &e).await;
                    call.send_data(leg_input(LegId::CALLER, LegEvent::Hangup)).await;
                    return;
                }
                None => {
                    call.send_data(leg_input(LegId::CALLER, LegEvent::Hangup)).await;
                    return;
                }
            },
            // Cancel-safe: mpsc recv.
            out = leg_rx.recv() => {
                let Some(out) = out else { return };
                let done = matches!(out, LegOutput::Hangup(_));
                if !forward(&mut socket, &call_id, out, &mut pools.to_phone).await || done {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    }
}

async fn register(
    shared: Arc<Shared>,
    directory: &Directory,
    mut socket: WebSocket,
    conn_id: u64,
    number: String,
    rate: SampleRate,
) {
    // One pending ring at a time: a second call while one rings finds the phone busy.
    let (ring_tx, mut ring_rx) = mpsc::channel(1);
    let taken = {
        let mut phones = directory.lock();
        let taken = phones.contains_key(&number);
        if !taken {
            let phone = RegisteredPhone {
                conn_id,
                rate,
                rings: ring_tx,
            };
            phones.insert(number.clone(), phone);
        }
        taken
    };
    if taken {
        let message = format!("{number} is already registered by another phone");
        send(&mut socket, NetworkFrame::Error { message }).await;
        return;
    }
    // The call this phone is on: its handle, our leg id in it, and what it sends us.
    let mut current: Option<(CallHandle, LegId, mpsc::Receiver<LegOutput>)> = None;
    let mut pools = Pools::default();
    if send(
        &mut socket,
        NetworkFrame::Registered {
            number: number.clone(),
        },
    )
    .await
    {
        loop {
            tokio::select! {
                // Cancel-safe: mpsc recv.
                Some(ring) = ring_rx.recv() => {
                    if current.as_ref().is_some_and(|(c, _, _)| !c.is_ended()) {
                        ring.call.send_data(leg_input(ring.leg, LegEvent::Rejected(Refusal::Busy))).await;
                        continue;
                    }
                    let frame = NetworkFrame::Incoming {
                        call_id: ring.call.call_id.to_string(),
                        from: ring.call.from.to_string(),
                        to: number.clone(),
                    };
                    current = Some((ring.call, ring.leg, ring.outputs));
                    if !send(&mut socket, frame).await {
                        break;
                    }
                }
                // Cancel-safe: WebSocket::recv is a stream poll.
                msg = socket.recv() => match msg {
                    Some(Ok(Message::Binary(pcm))) => {
                        if let Some((call, leg, _)) = &current {
                            let samples = pools.to_call.frame_from_pcm(&pcm);
                            call.send_data(leg_input(*leg, LegEvent::Audio(samples))).await;
                        }
                    }
                    Some(Ok(Message::Text(text))) => {
                        let event = match PhoneFrame::decode(&text) {
                            Ok(PhoneFrame::Answer) => Some(LegEvent::Answered),
                            Ok(PhoneFrame::Reject) => Some(LegEvent::Rejected(Refusal::Declined)),
                            Ok(PhoneFrame::Hangup) => Some(LegEvent::Hangup),
                            Ok(PhoneFrame::Dtmf { digit, duration_ms }) => Some(LegEvent::Dtmf { digit, duration_ms }),
                            Ok(other) => {
                                let message = format!("{other:?} is not valid for a registered phone");
                                send(&mut socket, NetworkFrame::Error { message }).await;
                                None
                            }
                            Err(e) => {
                                send(&mut socket, NetworkFrame::Error { message: e.to_string() }).await;
                                None
                            }
                        };
                        if let (Some(event), Some((call, leg, _))) = (event, &current) {
                            let ends = matches!(event, LegEvent::Rejected(_) | LegEvent::Hangup);
                            call.send_data(leg_input(*leg, event)).await;
                            if ends {
                                current = None;
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        close_if_too_big(&mut socket, &e).await;
                        break;
                    }
                    None => break,
                },
                // Cancel-safe: mpsc recv; pending while the phone is on no call.
                out = async {
                    match current.as_mut() {
                        Some((_, _, outputs)) => outputs.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let (Some(out), Some((call, _, _))) = (out, &current) else {
                        // The call ended without a word to us: the phone is free again.
                        current = None;
                        continue;
                    };
                    let ends = matches!(out, LegOutput::Hangup(_));
                    if !forward(&mut socket, &call.call_id, out, &mut pools.to_phone).await {
                        break;
                    }
                    if ends {
                        current = None;
                    }
                }
                // Cancel-safe: only observes the token.
                () = shared.shutdown.cancelled() => break,
            }
        }
    }
    if let Some((call, leg, _)) = current {
        call.send_data(leg_input(leg, LegEvent::Hangup)).await;
    }
    let mut phones = directory.lock();
    if phones.get(&number).is_some_and(|p| p.conn_id == conn_id) {
        phones.remove(&number);
    }
    drop(phones);
}

/// Sends one leg output to the phone, audio as s16le PCM split off `pcm_pool`. Returns false
/// if the socket is gone.
async fn forward(
    socket: &mut WebSocket,
    call_id: &str,
    out: LegOutput,
    pcm_pool: &mut FramePool,
) -> bool {
    // The call id is copied only into the rare text frames: audio frames cost no allocation.
    let call_id = || call_id.to_owned();
    let msg = match out {
        LegOutput::Audio(samples) => Message::Binary(frame_bytes(pcm_pool, None, &samples)),
        LegOutput::Ringing => {
            Message::Text(NetworkFrame::Ringing { call_id: call_id() }.encode().into())
        }
        LegOutput::Answered => Message::Text(
            NetworkFrame::Answered { call_id: call_id() }
                .encode()
                .into(),
        ),
        // The call mixes a simulated phone's DTMF into its audio as tones: nothing to send.
        LegOutput::Dtmf(_) => return true,
        // Calls transfer simulated phones by dialling the target themselves: never sent.
        LegOutput::Refer { .. } => return true,
        LegOutput::Hangup(reason) => Message::Text(
            NetworkFrame::Hangup {
                call_id: Some(call_id()),
                reason,
            }
            .encode()
            .into(),
        ),
    };
    match socket.send(msg).await {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %e, "phone socket failed");
            false
        }
    }
}

fn leg_input(leg: LegId, event: LegEvent) -> CallInput {
    CallInput::Leg { leg, event }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connector_owns_its_exact_transfer_targets_not_its_patterns() {
        let mut c = ConnectorConfig::development("k", "7b0e9c2a-1d1e-4a5b-9f55-2f1f3b7a9e01");
        c.numbers = vec!["+100".into()];
        c.transfer_targets = vec!["+300".into(), "+4*".into()];
        assert!(owns(&c, "+100") && owns(&c, "+300"));
        assert!(!owns(&c, "+4*") && !owns(&c, "+400"));
    }
}
