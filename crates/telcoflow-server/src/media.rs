//! The media plane: `/v1/agent/media/{call_id}`, one WebSocket per call.
//!
//! The bearer token from `call.in` must be valid for this call and unexpired, and be the one
//! handed to the session's current holder (a session offered again with `RESUME` and claimed
//! by another connection no longer takes its first holder's token); anything else gets 401 with
//! a body saying why. Once attached, text frames carry commands (forwarded to the call
//! actor, which answers each with a `command_response`) and binary frames carry the agent's
//! audio on channel 0. Malformed frames are logged and ignored; the connection stays up.

use crate::call::{AttachError, CallInput, MediaLink, MediaOut};
use crate::state::Shared;
use crate::token::TokenError;
use axum::extract::ws::{
    Message, Utf8Bytes, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use futures_util::SinkExt;
use serde_json::Value;
use std::sync::Arc;
use std::time::SystemTime;
use telcoflow_proto::ErrorCode;
use telcoflow_proto::media::{
    AudioFrame, CHANNEL_MIXED, CommandResponse, MediaClientFrame, MediaServerFrame,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info_span};

/// `GET /v1/agent/media/{call_id}`.
pub(crate) async fn media_ws(
    State(shared): State<Arc<Shared>>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return (
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token> header",
        )
            .into_response();
    };
    // An expired token still brings back an agent that lost its connection while the call
    // waits for it (the call decides): the signature proves it is the same agent.
    let token_expired = match shared.signer.verify(token, &call_id, SystemTime::now()) {
        Ok(()) => false,
        Err(TokenError::Expired) => true,
        Err(e) => return (StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let Some(call) = shared.registry.call_by_id(&call_id) else {
        return (
            StatusCode::NOT_FOUND,
            "the call has ended or does not exist",
        )
            .into_response();
    };
    if !shared
        .registry
        .is_current_media_token(&call.session_id, token)
    {
        return (
            StatusCode::UNAUTHORIZED,
            "media token was issued to a control connection that no longer holds this session",
        )
            .into_response();
    }
    let conn_id = shared.next_conn_id();
    let (tx, rx) = mpsc::channel(shared.config.limits.media_send_queue);
    let (reply_tx, reply_rx) = oneshot::channel();
    let attach = CallInput::MediaAttach {
        link: MediaLink { conn_id, tx },
        token_expired,
        reply: reply_tx,
    };
    if !call.send_wait(attach).await {
        return (StatusCode::NOT_FOUND, "the call has ended").into_response();
    }
    match reply_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e @ AttachError::TokenExpired)) => {
            return (StatusCode::UNAUTHORIZED, e.to_string()).into_response();
        }
        Ok(Err(e)) => return (StatusCode::CONFLICT, e.to_string()).into_response(),
        Err(_) => return (StatusCode::NOT_FOUND, "the call has ended").into_response(),
    }
    let max = shared.config.limits.max_media_frame_bytes;
    let tracker = shared.tasks.token();
    ws.max_message_size(max)
        .read_buffer_size(crate::WS_READ_BUFFER)
        .max_frame_size(max)
        .on_failed_upgrade({
            let call = call.clone();
            move |_| {
                call.send(CallInput::MediaDetach {
                    conn_id,
                    agent_closed: false,
                });
            }
        })
        .on_upgrade(move |socket| async move {
            let span = info_span!(
                "media",
                call_id = %call.call_id,
                session_id = %call.session_id,
                conn_id
            );
            run(shared, call, socket, conn_id, rx)
                .instrument(span)
                .await;
            drop(tracker);
        })
}

/// Most frames written to the socket before it is flushed.
const MAX_BATCH: usize = 16;

/// Bytes of ping payloads (4 each) taken from the allocator at once.
const PING_PAYLOAD_BLOCK: usize = 1024;

async fn run(
    shared: Arc<Shared>,
    call: crate::call::CallHandle,
    mut socket: WebSocket,
    conn_id: u64,
    mut rx: mpsc::Receiver<MediaOut>,
) {
    debug!("media connection open");
    shared.metrics.media_connections_total.inc();
    let _open = crate::metrics::Held::new(&shared.metrics.media_connections);
    // Resolved once: one atomic add per frame.
    let frames_in = shared.metrics.agent_frames_in.clone();
    let frames_out = shared.metrics.agent_frames_out.clone();
    // Commands sent to the call and not yet answered. Bounded so that a client cannot pile up
    // work faster than the call answers it.
    let max_in_flight = shared.config.limits.max_pending_commands_per_call;
    let mut in_flight = 0usize;
    // One waiter for the connection's life: a new one per frame would lock the server-wide
    // token's waiter list twice, a list every call's tasks share.
    let shutdown = shared.shutdown.clone().cancelled_owned();
    tokio::pin!(shutdown);
    // The agent sent a close frame: it is leaving, not losing the connection.
    let mut agent_closed = false;
    // Ping payloads are cut from one block, a few hundred pings per allocation: pings come
    // with every dry spell of the agent's audio, and the media path allocates nothing per frame.
    let mut ping_payloads = BytesMut::new();
    loop {
        tokio::select! {
            biased;
            // Cancel-safe: mpsc recv. Outgoing first so responses are not held behind audio input.
            out = rx.recv() => {
                // Everything already queued leaves in one write: a caller frame and the buffer
                // request behind it wake the agent once, and cost one system call here.
                let mut next = out;
                let mut written = 0;
                let closing = loop {
                    let msg = match next {
                        Some(MediaOut::Text(text)) => Message::Text(text.into()),
                        // serde_json writes UTF-8, so the check cannot fail; `{}` is what
                        // `MediaServerFrame::encode` sends if encoding ever did.
                        Some(MediaOut::Json(json)) => Message::Text(
                            Utf8Bytes::try_from(json).unwrap_or(Utf8Bytes::from_static("{}")),
                        ),
                        Some(MediaOut::Response(text)) => {
                            in_flight = in_flight.saturating_sub(1);
                            Message::Text(text.into())
                        }
                        Some(MediaOut::Audio(frame)) => {
                            frames_out.inc();
                            Message::Binary(frame)
                        }
                        Some(MediaOut::Ping(seq)) => {
                            if ping_payloads.capacity() < 4 {
                                ping_payloads = BytesMut::with_capacity(PING_PAYLOAD_BLOCK);
                            }
                            ping_payloads.put_u32(seq);
                            Message::Ping(ping_payloads.split().freeze())
                        }
                        Some(MediaOut::Close) | None => break true,
                    };
                    if socket.feed(msg).await.is_err() {
                        break true;
                    }
                    written += 1;
                    match rx.try_recv() {
                        Ok(out) if written < MAX_BATCH => next = Some(out),
                        Ok(out) => {
                            // Flush what is batched; the rest starts the next batch.
                            if socket.flush().await.is_err() {
                                break true;
                            }
                            written = 0;
                            next = Some(out);
                        }
                        Err(_) => break false,
                    }
                };
                if closing {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
                if socket.flush().await.is_err() {
                    break;
                }
            }
            // Cancel-safe: WebSocket::recv is a stream poll.
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(text))) => {
                    match decode_command(&text, conn_id, &mut socket).await {
                        Some(CallInput::Command { command, .. }) if in_flight >= max_in_flight => {
                            let resp = CommandResponse::error(
                                command.command_id,
                                ErrorCode::QuotaExceeded,
                                format!("{max_in_flight} commands are already waiting for an answer (limits.max_pending_commands_per_call)"),
                            );
                            let text = MediaServerFrame::CommandResponse(resp).encode();
                            if socket.send(Message::Text(text.into())).await.is_err() {
                                break;
                            }
                        }
                        Some(input) => {
                            in_flight += 1;
                            if !call.send_data(input).await {
                                break;
                            }
                        }
                        None => {}
                    }
                }
                Some(Ok(Message::Binary(frame))) => match AudioFrame::decode(&frame) {
                    Ok(audio) if audio.channel == CHANNEL_MIXED => {
                        frames_in.inc();
                        let pcm = frame.slice(1..);
                        if !call.send_data(CallInput::AgentAudio { conn_id, pcm }).await {
                            break;
                        }
                    }
                    Ok(audio) => debug!(channel = audio.channel, "agent audio for a channel other than 0 ignored"),
                    Err(e) => debug!(error = %e, "binary frame ignored"),
                },
                Some(Ok(Message::Close(_))) => {
                    agent_closed = true;
                    break;
                }
                Some(Ok(Message::Pong(payload))) => {
                    let seq = <[u8; 4]>::try_from(&payload[..]).ok().map(u32::from_be_bytes);
                    if !call.send_data(CallInput::MediaPong { conn_id, seq }).await {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    debug!(error = %e, "media connection failed");
                    if let Some(close) = crate::close_for_receive_error(&e, "limits.max_media_frame_bytes") {
                        let _ = socket.send(Message::Close(Some(close))).await;
                    }
                    break;
                }
                None => break,
            },
            // Cancel-safe: only observes the token.
            () = &mut shutdown => {
                // The call actor ends the call and sends its last frames; drain them briefly.
                while let Ok(Some(out)) = tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await {
                    match out {
                        MediaOut::Text(text) | MediaOut::Response(text) => {
                            let _ = socket.send(Message::Text(text.into())).await;
                        }
                        MediaOut::Json(json) => {
                            if let Ok(text) = Utf8Bytes::try_from(json) {
                                let _ = socket.send(Message::Text(text)).await;
                            }
                        }
                        MediaOut::Audio(_) | MediaOut::Ping(_) => {}
                        MediaOut::Close => break,
                    }
                }
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
        }
    }
    call.send(CallInput::MediaDetach {
        conn_id,
        agent_closed,
    });
    debug!(agent_closed, "media connection closed");
}

/// Decodes a text frame into a command. A frame that is not a command but names a
/// `command_id` is answered with `INVALID_REQUEST`; anything else is logged and ignored.
async fn decode_command(text: &str, conn_id: u64, socket: &mut WebSocket) -> Option<CallInput> {
    match MediaClientFrame::decode(text) {
        Ok(MediaClientFrame::Command(command)) => Some(CallInput::Command { conn_id, command }),
        Err(e) => {
            debug!(error = %e, "malformed media frame ignored");
            let command_id = serde_json::from_str::<Value>(text).ok().and_then(|v| {
                v.get("data")
                    .and_then(|d| d.get("command_id"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
            if let Some(command_id) = command_id {
                let resp = CommandResponse::error(
                    command_id,
                    ErrorCode::InvalidRequest,
                    format!("malformed command: {e}"),
                );
                let _ = socket
                    .send(Message::Text(
                        MediaServerFrame::CommandResponse(resp).encode().into(),
                    ))
                    .await;
            }
            None
        }
    }
}
