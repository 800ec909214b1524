//! The media driver: one task per open media connection that reads audio and events, answers
//! the server's `buffer_request`s from the call's ring buffer and writes commands, and brings
//! a lost connection back while the server holds the call for its agent.

use super::audio::on_audio;
use super::event::CallEvent;
use super::flow::{FlowControl, Outgoing};
use super::marks::MarkTracker;
use super::{CallCore, Media, emit, emit_client, set_terminated};
use crate::Error;
use crate::error::{CallError, CallErrorKind};
use crate::event::ClientEvent;
use crate::transport::{self, OpenError, Ws};
use futures_util::{SinkExt, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use telcoflow_proto::media::{self, MediaServerFrame};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, trace, warn};

/// How long the media connection keeps reading after the call ended (`call.terminated`,
/// `close`, `disconnect`) while waiting for the server to close it: frames already in flight,
/// such as the server's `call.terminated` or answers to concurrent commands, still land, and
/// a server that never closes cannot hold the connection open.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a media connection that was lost (not closed) is tried again: the server keeps a
/// call waiting for its agent for 10 s.
const MEDIA_RECONNECT_WINDOW: Duration = Duration::from_secs(9);
/// First pause between two attempts to bring a lost media connection back; it doubles up to
/// [`MEDIA_RECONNECT_MAX_DELAY`].
const MEDIA_RECONNECT_DELAY: Duration = Duration::from_millis(50);
const MEDIA_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

pub(super) async fn open_media(core: &CallCore) -> Result<Ws, OpenError> {
    if core.cancel.is_cancelled() {
        return Err(OpenError::Failed(Error::Shutdown));
    }
    let mut req = transport::request(&core.url).map_err(OpenError::Failed)?;
    transport::add_secret(&mut req, "authorization", &format!("Bearer {}", core.token))
        .map_err(OpenError::Failed)?;
    debug!("opening media connection");
    tokio::select! {
        r = transport::try_connect(req, &core.settings.tls, core.settings.connect_timeout) => r,
        () = core.cancel.cancelled() => Err(OpenError::Failed(Error::Shutdown)),
    }
}

/// Opens the media connection again after it was lost, while the server keeps the call
/// waiting for its agent: same URL and token, attempts spaced out from
/// [`MEDIA_RECONNECT_DELAY`] to [`MEDIA_RECONNECT_MAX_DELAY`]. `None` once the call has ended,
/// the client shuts down, the server refuses for any other reason than the old connection
/// still being attached (409), or [`MEDIA_RECONNECT_WINDOW`] has passed.
async fn reopen_media(core: &CallCore, media: &Media) -> Option<Ws> {
    let deadline = tokio::time::Instant::now() + MEDIA_RECONNECT_WINDOW;
    let mut delay = MEDIA_RECONNECT_DELAY;
    loop {
        if media.ring.is_closed() || media.shutdown.load(Ordering::Acquire) {
            return None;
        }
        match tokio::time::timeout_at(deadline, open_media(core)).await {
            Err(_) => return None,
            Ok(Ok(ws)) => return Some(ws),
            // The server has not seen the loss yet.
            Ok(Err(OpenError::Refused(StatusCode::CONFLICT, _))) => {}
            Ok(Err(OpenError::Refused(status, body))) => {
                debug!(%status, body, "media connection refused; the call cannot come back");
                return None;
            }
            Ok(Err(OpenError::Failed(Error::Shutdown))) => return None,
            Ok(Err(OpenError::Failed(e))) => debug!(error = %e, "media connection not back yet"),
        }
        let next = tokio::time::Instant::now() + delay;
        if next >= deadline {
            return None;
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = core.cancel.cancelled() => return None,
        }
        delay = (delay * 2).min(MEDIA_RECONNECT_MAX_DELAY);
    }
}

/// Owns the media WebSocket until it closes, the call ends or the client shuts down.
pub(super) async fn drive_media(
    core: Arc<CallCore>,
    media: Arc<Media>,
    mut ws: Ws,
    mut out_rx: mpsc::Receiver<Message>,
) {
    debug!("media connection open");
    // Shutdown reaches the driver as a flag and a wake-up: polling the token's waiter on each
    // of the driver's polls would take two locks per frame.
    let _watcher = AbortOnDropHandle::new(tokio::spawn({
        let cancel = core.cancel.clone();
        let media = media.clone();
        async move {
            cancel.cancelled().await;
            media.shutdown.store(true, Ordering::Release);
            media.driver.wake();
        }
    }));
    let mut flow = FlowControl::new(media.ring.capacity());
    let reason = loop {
        let ended = {
            let grace = std::pin::pin!(tokio::time::sleep(CLOSE_GRACE));
            let mut driver = MediaDriver {
                core: &core,
                media: &media,
                ws: &mut ws,
                out_rx: &mut out_rx,
                flow: &mut flow,
                grace,
                call_live: true,
                flushing: false,
            };
            std::future::poll_fn(|cx| driver.poll(cx)).await
        };
        let reason = match ended {
            Ended::Done(reason) => break reason,
            Ended::Lost(reason) => reason,
        };
        debug!(reason, "media connection lost; bringing it back");
        // What was on its way over the lost connection has an unknown outcome.
        fail_commands(&media, &mut out_rx, || {
            CallError::with_message(
                CallErrorKind::Connection,
                "the media connection was lost before the command was answered",
            )
        });
        match reopen_media(&core, &media).await {
            Some(reopened) => {
                debug!("media connection back");
                ws = reopened;
                // The server asks for audio again on the new connection.
                flow.forget_requests();
                emit(&core, CallEvent::MediaReconnected);
                let lost = media.marks.lock().lost_in_transit();
                emit_cleared_marks(&core, lost);
            }
            None => break reason,
        }
    };
    debug!(reason, "media connection closing");
    // Commands sent from now on fail at once.
    drop(out_rx);
    set_terminated(&core);
    media.ring.close();
    {
        let mut p = media.pending.lock();
        p.closed = true;
        for (_, tx) in p.map.drain() {
            let _ = tx.send(Err(CallError::new(CallErrorKind::Closed)));
        }
    }
    core.channels.lock().finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    // Marks still outstanding will never be reached. Reported before the call's end, which
    // may already be out if the server's came first.
    let left = media.marks.lock().drain();
    emit_cleared_marks(&core, left);
    // The server's own `call.terminated` (with its reason) was already delivered if it came;
    // otherwise the stream still ends with one.
    if !media.terminated_seen.load(Ordering::Acquire) {
        emit(&core, CallEvent::Terminated { reason: None });
    }
    core.events_tx.lock().take();
}

/// How a media connection ended, with the reason for the log.
enum Ended {
    /// For good: closed by either side, the call over, or the client shutting down.
    Done(&'static str),
    /// Lost: a transport error, or the connection ended without a close frame. The server
    /// keeps the call waiting for its agent for a while.
    Lost(&'static str),
}

/// The media connection's reader and writer, polled as one future by one task: the socket
/// is not split (no lock between the halves), and the writer needs no wake-up for the
/// server's buffer requests, because they come in through the reader, which runs first in
/// every poll.
struct MediaDriver<'a> {
    core: &'a CallCore,
    media: &'a Media,
    ws: &'a mut Ws,
    out_rx: &'a mut mpsc::Receiver<Message>,
    flow: &'a mut FlowControl,
    /// Armed once the call has ended (the ring buffer closed): commands still go out (a
    /// `close` sent last), and the reader goes on until the server closes the connection, for
    /// at most this long.
    grace: Pin<&'a mut tokio::time::Sleep>,
    call_live: bool,
    /// A frame was handed to the socket and is not flushed yet.
    flushing: bool,
}

impl MediaDriver<'_> {
    /// Ready once the connection ends, with how.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        self.media.driver.register(cx.waker());
        if self.media.shutdown.load(Ordering::Acquire) {
            return Poll::Ready(Ended::Done("shutdown"));
        }
        // Reader first: frames that have arrived are handled, and their buffer requests
        // queued, before the writer looks and before the grace period can end the connection.
        loop {
            let msg = match self.ws.poll_next_unpin(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => return Poll::Ready(Ended::Done("closed by server")),
                Poll::Ready(Some(Err(e))) => {
                    debug!(error = %e, "media connection failed");
                    return Poll::Ready(Ended::Lost("connection error"));
                }
                Poll::Ready(Some(Ok(msg))) => msg,
            };
            match msg {
                Message::Binary(data) => on_audio(self.core, data),
                // After `call.terminated` keep reading until the server closes, so that
                // frames already sent still land.
                Message::Text(text) => on_text(self.core, self.media, self.flow, &text),
                Message::Close(_) => return Poll::Ready(Ended::Done("closed by server")),
                // The socket queues the pong and sends it only on a flush: flush now, so the
                // server, which pings when our audio runs dry, does not take a silent agent
                // for a stalled one.
                Message::Ping(_) => self.flushing = true,
                _ => {}
            }
        }
        self.poll_write(cx)
    }

    /// Sends what is due, commands first, until nothing is or the socket is full. Audio
    /// frames go straight from the ring buffer to the socket.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        loop {
            if self.flushing {
                match self.ws.poll_flush_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        debug!(error = %e, "media send failed");
                        return Poll::Ready(Ended::Lost("send failed"));
                    }
                    Poll::Ready(Ok(())) => self.flushing = false,
                }
            }
            match self.ws.poll_ready_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, "media send failed");
                    return Poll::Ready(Ended::Lost("send failed"));
                }
                Poll::Ready(Ok(())) => {}
            }
            let msg = match self.out_rx.poll_recv(cx) {
                Poll::Ready(Some(m)) => m,
                // Every sender is gone: nothing can be sent any more.
                Poll::Ready(None) => return Poll::Ready(Ended::Done("command queue closed")),
                Poll::Pending if self.call_live => {
                    match self.flow.poll_next_frame(cx, &self.media.ring) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Outgoing::Audio(frame))) => Message::Binary(frame),
                        Poll::Ready(Some(Outgoing::Mark(mark))) => {
                            Message::Text(self.media.marks.lock().command(&mark).into())
                        }
                        Poll::Ready(None) => {
                            debug!(
                                "call ended; waiting for the server to close the media connection"
                            );
                            self.call_live = false;
                            let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
                            self.grace.as_mut().reset(deadline);
                            continue;
                        }
                    }
                }
                Poll::Pending => {
                    return match self.grace.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            Poll::Ready(Ended::Done("server did not close after the call ended"))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            };
            if let Err(e) = self.ws.start_send_unpin(msg) {
                debug!(error = %e, "media send failed");
                return Poll::Ready(Ended::Lost("send failed"));
            }
            self.flushing = true;
        }
    }
}

/// Reports marks that will never be reached.
fn emit_cleared_marks(core: &CallCore, names: Vec<Box<str>>) {
    for name in names {
        emit(
            core,
            CallEvent::Mark {
                name: name.into(),
                cleared: true,
                played_ms: None,
            },
        );
    }
}

/// Fails every command waiting for an answer, and drops those not sent yet, with `error`.
fn fail_commands(
    media: &Media,
    out_rx: &mut mpsc::Receiver<Message>,
    error: impl Fn() -> CallError,
) {
    while out_rx.try_recv().is_ok() {}
    for (_, tx) in media.pending.lock().map.drain() {
        let _ = tx.send(Err(error()));
    }
}

/// Handles one text frame.
fn on_text(core: &CallCore, media: &Media, flow: &mut FlowControl, text: &str) {
    let frame = match MediaServerFrame::decode(text) {
        Ok(f) => f,
        Err(e) => {
            debug!(error = %e, "ignoring undecodable media frame");
            return;
        }
    };
    match frame {
        MediaServerFrame::CommandResponse(resp) => {
            debug!(command_id = %resp.command_id, success = resp.success, code = ?resp.error_code, "command response");
            if let Some(tx) = media.pending.lock().map.remove(&resp.command_id) {
                let _ = tx.send(Ok(resp));
            } else if let Some(id) = MarkTracker::response_id(&resp.command_id) {
                on_mark_response(core, media, id, &resp);
            }
        }
        MediaServerFrame::BufferRequest(req) => {
            trace!(
                requested = req.requested_bytes,
                frame = req.prefer_audio_frame_bytes,
                channel = req.channel_id,
                "buffer request"
            );
            if req.channel_id != media::CHANNEL_MIXED || req.requested_bytes == 0 {
                // Only channel 0 carries agent audio.
                return;
            }
            flow.request(req);
        }
        MediaServerFrame::CallEvent(ev) => {
            if ev.event == media::CallEvent::MARK {
                // Ours carry the mark's number: one reported already (given up when the
                // connection was lost) is not reported twice.
                if let Some(id) = ev.fields.get("id").and_then(serde_json::Value::as_u64) {
                    if media.marks.lock().finish(id).is_none() {
                        debug!(id, "mark reported already");
                        return;
                    }
                }
            }
            let ev = CallEvent::from_wire(ev);
            debug!(event = ?ev, "call event");
            let ended = matches!(ev, CallEvent::Terminated { .. });
            if let CallEvent::Error { code, message } = &ev {
                emit_client(
                    core,
                    ClientEvent::CallError {
                        call_id: core.id.clone(),
                        code: code.clone(),
                        message: message.clone(),
                    },
                );
            }
            if ended {
                media.terminated_seen.store(true, Ordering::Release);
                set_terminated(core);
                media.ring.close();
            }
            emit(core, ev);
        }
    }
}

/// The server's answer to an `agent.mark`: it holds the mark, or refused it (reported as
/// cleared: it will never be reached).
fn on_mark_response(core: &CallCore, media: &Media, id: u64, resp: &media::CommandResponse) {
    let mut marks = media.marks.lock();
    if resp.success {
        marks.placed(id);
        return;
    }
    let Some(name) = marks.finish(id) else {
        return;
    };
    drop(marks);
    warn!(
        mark = %name,
        code = ?resp.error_code,
        message = ?resp.error_message,
        "the server refused a mark"
    );
    emit_cleared_marks(core, vec![name]);
}
