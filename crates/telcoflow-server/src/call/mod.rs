//! The call: one actor task per call that owns its legs, its agent media link, the playout
//! buffer and the mixing, and runs the 20 ms media clock.
//!
//! Inputs arrive on two bounded queues: `control` for rare lifecycle events sent from code that
//! cannot wait (the registry, under its lock), and `data` for audio and commands, where senders
//! wait, which is the backpressure. Everything the call does to the outside (legs, media
//! connection, registry) goes out without awaiting, so one slow peer cannot stall the call.
//!
//! Audio paths, all at the agent's sample rate inside the call:
//! - caller alone: caller audio is forwarded to the agent the moment it arrives (no clock wait);
//!   agent audio is played to the caller one frame per tick from the playout buffer.
//! - after `call.connect`: each tick mixes one frame of every party; the agent hears both legs,
//!   and the legs hear each other plus the agent as whisper / barge / spy decide.
//!
//! The files, by concern: [`handle`] (what the rest of the server sees), [`leg`] (what legs
//! see), `actor` (the task, its lifecycle and deadlines), `agent` (the media connection: attach,
//! send policy, buffer requests), `commands` (command dispatch and `call.connect`), `legs` (a
//! leg as the call keeps it: resamplers, its queue, the send policy), `mixing` (audio from the
//! legs, the 20 ms tick and the mix), `playout` (the agent's playout buffer), `transfer`
//! (`call.transfer`: REFER to a SIP caller, or dial and bridge) and
//! [`frames`] (frame storage). The call logic reads no clock: the actor's loop passes `now` in.

mod actor;
mod agent;
mod commands;
mod frames;
mod handle;
mod leg;
mod legs;
mod live;
mod meter;
mod mixing;
mod playout;
mod quality;
mod transfer;

pub(crate) use frames::{SamplePool, frame_bytes};
pub(crate) use handle::{AttachError, CallHandle, CallInput, MediaLink, MediaOut, StatsError};
pub(crate) use leg::{
    LegEvent, LegId, LegKind, LegLink, LegOutput, LegQuality, NetFigures, Refusal,
};
pub(crate) use live::{EndedCall, EndedCalls, LiveSnapshot};

use crate::config::ConnectorConfig;
use crate::registry::OpenError;
use crate::state::Shared;
use actor::CallActor;
use handle::Queues;
use std::sync::Arc;
use telcoflow_proto::ErrorCode;
use telcoflow_proto::control::{Channel, Initiator, SessionInfo, SessionState, SetupData};
use telcoflow_proto::sim::HangupReason;
use tokio::time::Instant;
use tracing::{Instrument, info_span};

/// Starts a call for an incoming leg, registers its session and notifies the connector.
pub(crate) fn spawn_incoming(
    shared: &Arc<Shared>,
    connector: Arc<ConnectorConfig>,
    from: &str,
    to: &str,
    caller: LegLink,
) -> Result<CallHandle, ErrorCode> {
    let (handle, queues) = CallHandle::new(from, to, &connector.uuid);
    let info = session_info(&handle, Initiator::Connector, from, to);
    let connector_id: Arc<str> = connector.uuid.as_str().into();
    // The actor must exist before the registry can notify anyone about it: a claim arriving
    // right after the notification sends `Claimed` to its queue.
    let actor = CallActor::new(
        shared.clone(),
        connector,
        handle.clone(),
        caller,
        None,
        Instant::now(),
    );
    shared
        .registry
        .open_call_session(
            &connector_id,
            shared.config.limits.max_calls_per_connector,
            info,
            handle.clone(),
            None,
        )
        .map_err(|e| e.code())?;
    run_actor(shared, actor, queues);
    Ok(handle)
}

/// Starts an outbound call for `session.create`: rings `remote` and registers the session as
/// already held by the creating control connection. The app's `call.answer` completes when the
/// far end picks up.
pub(crate) fn spawn_outbound(
    shared: &Arc<Shared>,
    connector: Arc<ConnectorConfig>,
    sm_ws_id: &str,
    setup: SetupData,
    remote: &str,
) -> Result<CallHandle, (ErrorCode, String)> {
    if shared.is_draining() {
        return Err((
            ErrorCode::InternalError,
            "this node is draining and starts no new calls: create the session on another node"
                .to_owned(),
        ));
    }
    let caller_id = connector.outbound_caller_id.clone().unwrap_or_default();
    let (handle, queues) = CallHandle::new(&caller_id, remote, &connector.uuid);
    let link = shared
        .networks
        .ring(remote, &handle, LegId::CALLER)
        .map_err(|e| {
            (
                ErrorCode::NoRoute,
                format!("{remote} cannot be reached: {e}"),
            )
        })?;
    let info = session_info(&handle, Initiator::Sdk, remote, &caller_id);
    let connector_id: Arc<str> = connector.uuid.as_str().into();
    let actor = CallActor::new(
        shared.clone(),
        connector,
        handle.clone(),
        link.clone(),
        Some(setup),
        Instant::now(),
    );
    if let Err(e) = shared.registry.open_call_session(
        &connector_id,
        shared.config.limits.max_calls_per_connector,
        info,
        handle.clone(),
        Some(sm_ws_id.to_owned()),
    ) {
        let (reason, message) = match &e {
            OpenError::QuotaExceeded => (
                HangupReason::Busy,
                "the connector's call limit is reached".to_owned(),
            ),
            OpenError::Registry(e) => (HangupReason::Error, e.to_string()),
        };
        let _ = link.tx.try_send(LegOutput::Hangup(reason));
        return Err((e.code(), message));
    }
    run_actor(shared, actor, queues);
    Ok(handle)
}

fn session_info(
    handle: &CallHandle,
    initiator: Initiator,
    remote: &str,
    local: &str,
) -> SessionInfo {
    SessionInfo {
        id: handle.session_id.to_string(),
        channel: Channel::Telco,
        initiator,
        state: SessionState::Open,
        remote_address: remote.to_owned(),
        local_address: local.to_owned(),
        opened_at: crate::token::unix_now(),
        closed_at: None,
    }
}

fn run_actor(shared: &Arc<Shared>, actor: CallActor, (control, data): Queues) {
    let handle = &actor.handle;
    shared.registry.index_call(handle);
    shared.metrics.sessions.inc();
    shared.metrics.sessions_open.inc();
    // Both ids on the call's span, so that every line logged inside the call carries them.
    let span = info_span!("call", call_id = %handle.call_id, session_id = %handle.session_id);
    shared
        .tasks
        .spawn(actor.run(control, data).instrument(span));
}

#[cfg(test)]
mod tests;
