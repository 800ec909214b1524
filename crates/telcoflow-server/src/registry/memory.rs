//! The in-memory registry: sessions, claims, control connections and call counts of a server
//! that is its own cluster, in one process.
//!
//! Every method is synchronous and holds the lock only for map updates; frames to control
//! connections are queued with `try_send` on bounded queues, never awaited under the lock.
//! Node-local state and the directory share the one lock, so that a control connection that
//! joins sees each session exactly once: in the sessions offered to it, or in a notification.

use super::link::ControlLink;
use super::outcome::{
    ClaimError, ConsoleView, ControlView, OpenError, ReadyOutcome, SessionPage, SessionQuery,
};
use crate::call::{CallHandle, CallInput};
use crate::token::unix_now;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use telcoflow_proto::control::{
    Activity, Channel, CloseReason, Initiator, ServerFrame, SessionInfo, SessionState, SetupData,
};
use tracing::debug;

#[derive(Debug)]
struct SessionRecord {
    info: SessionInfo,
    connector: Arc<str>,
    bound: Option<String>,
    /// The node of a holder on another node of a cluster, kept with the holder so that the
    /// end of the session always finds whom to tell.
    bound_node: Option<String>,
    ready: bool,
    /// Media connected: the session no longer depends on its control connection.
    media_attached: bool,
    call: Option<CallHandle>,
    /// The media token of the latest `call.in`. A session offered again (`RESUME`) forgets it,
    /// so that a token minted for the holder that left cannot attach to the call it lost.
    media_token: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    controls: HashMap<String, ControlLink>,
    sessions: HashMap<String, SessionRecord>,
    /// Open calls per connector.
    calls: HashMap<Arc<str>, usize>,
    /// Running calls by call id, for the media plane.
    by_call_id: HashMap<Arc<str>, CallHandle>,
    /// Closed sessions per connector, oldest first, to forget the oldest beyond the cap.
    closed: HashMap<Arc<str>, VecDeque<String>>,

    /// Control connections per connector, counted from their upgrade (see [`ControlSlot`]).
    control_slots: HashMap<Arc<str>, usize>,
}

/// The registry of a server that is its own cluster: every record in this process, under
/// one lock. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct MemoryRegistry {
    state: Arc<Mutex<State>>,
    /// Closed sessions kept per connector (`limits.max_closed_sessions_per_connector`).
    max_closed: usize,
}

impl MemoryRegistry {
    /// A registry keeping at most `max_closed` closed sessions per connector.
    pub(crate) fn new(max_closed: usize) -> Self {
        Self {
            state: Arc::default(),
            max_closed,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in the few lines of map code below;
        // the maps stay consistent between statements, so recovering the guard is sound.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for one more control connection of `connector`, if it holds fewer than
    /// `limit`. Taken before the upgrade is answered, so that connections still in their
    /// handshake or before `setup` count too.
    pub(crate) fn reserve_control(&self, connector: &str, limit: usize) -> bool {
        let mut state = self.lock();
        let held = state.control_slots.entry(connector.into()).or_default();
        if *held >= limit {
            return false;
        }
        *held += 1;
        true
    }

    /// Gives back a place taken by [`Self::reserve_control`].
    pub(crate) fn release_control(&self, connector: &str) {
        let mut state = self.lock();
        if let Some(held) = state.control_slots.get_mut(connector) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                state.control_slots.remove(connector);
            }
        }
    }

    /// Adds a control connection after `setup` and offers it every session of its connector that
    /// nobody holds.
    pub(crate) fn add_control(&self, sm_ws_id: &str, link: ControlLink) {
        let mut state = self.lock();
        let now = unix_now();
        for s in state.sessions.values() {
            let inbound = s.info.initiator == Initiator::Connector;
            if s.connector == link.connector && offerable(s) && (link.inbound_calls || !inbound) {
                let activity = if s.info.initiator == Initiator::Connector && !s.ready {
                    Activity::NewIncomingCall
                } else {
                    Activity::Resume
                };
                link.send(notify(&s.info, activity, now));
            }
        }
        state.controls.insert(sm_ws_id.to_owned(), link);
    }

    /// `call_flow.setup`: whether incoming calls are offered to this connection.
    pub(crate) fn set_inbound_calls(&self, sm_ws_id: &str, inbound_calls: bool) {
        if let Some(link) = self.lock().controls.get_mut(sm_ws_id) {
            link.inbound_calls = inbound_calls;
        }
    }

    /// Removes a control connection. Sessions it held whose media is not connected yet are
    /// offered again (`RESUME`) to the connector's other connections; the others stay held.
    pub(crate) fn remove_control(&self, sm_ws_id: &str) {
        let mut state = self.lock();
        let Some(link) = state.controls.remove(sm_ws_id) else {
            return;
        };
        let now = unix_now();
        let mut resumed = Vec::new();
        // A session whose media is up stays held by the departed connection: its agent is
        // still on the call, and another claimant must get SESSION_BUSY, not the call.
        for s in state.sessions.values_mut() {
            if s.bound.as_deref() == Some(sm_ws_id)
                && s.info.state == SessionState::Open
                && !s.media_attached
            {
                s.bound = None;
                s.bound_node = None;
                s.ready = false;
                s.media_token = None;
                let inbound = s.info.initiator == Initiator::Connector;
                resumed.push((notify(&s.info, Activity::Resume, now), inbound));
            }
        }
        for (frame, inbound) in resumed {
            debug!(?frame, "offering session again");
            broadcast(&state.controls, &link.connector, &frame, inbound);
        }
    }

    /// Registers a new call session and notifies every control connection of the connector.
    /// Fails with `QUOTA_EXCEEDED` at the connector's call limit.
    pub(crate) fn open_call_session(
        &self,
        connector: &Arc<str>,
        max_calls: usize,
        info: SessionInfo,
        call: CallHandle,
        bound: Option<String>,
    ) -> Result<(), OpenError> {
        let mut state = self.lock();
        let count = state.calls.entry(connector.clone()).or_default();
        if *count >= max_calls {
            return Err(OpenError::QuotaExceeded);
        }
        *count += 1;
        if bound.is_none() {
            let frame = notify(&info, Activity::NewIncomingCall, unix_now());
            let inbound = info.initiator == Initiator::Connector;
            broadcast(&state.controls, connector, &frame, inbound);
        }
        insert_session(&mut state, connector, info, call, bound);
        Ok(())
    }

    /// Registers a call session of this node without counting or offering it: the cluster
    /// counts calls and offers sessions itself.
    pub(crate) fn insert_call_session(
        &self,
        connector: &Arc<str>,
        info: SessionInfo,
        call: CallHandle,
        bound: Option<String>,
    ) {
        insert_session(&mut self.lock(), connector, info, call, bound);
    }

    /// Offers a session to every connection of `connector` on this node that takes it and
    /// for whose id `send` says yes.
    pub(crate) fn offer_where(
        &self,
        connector: &str,
        frame: &ServerFrame,
        inbound: bool,
        mut send: impl FnMut(&str) -> bool,
    ) {
        for (sm_ws_id, link) in &self.lock().controls {
            if &*link.connector == connector && (link.inbound_calls || !inbound) && send(sm_ws_id) {
                link.send(frame.clone());
            }
        }
    }

    /// A control connection of this node.
    pub(crate) fn link(&self, sm_ws_id: &str) -> Option<ControlLink> {
        self.lock().controls.get(sm_ws_id).cloned()
    }

    /// Adds a control connection without offering it anything (the cluster offers from its
    /// records, which hold only sessions it admitted).
    pub(crate) fn insert_link(&self, sm_ws_id: &str, link: ControlLink) {
        self.lock().controls.insert(sm_ws_id.to_owned(), link);
    }

    /// Removes a control connection without offering its sessions again (the cluster does).
    pub(crate) fn remove_link(&self, sm_ws_id: &str) {
        self.lock().controls.remove(sm_ws_id);
    }

    /// Binds an open session of this node to a holder, on `node` when that is another node of
    /// a cluster, and tells its call the holder's audio format. True as well when that holder
    /// holds it already (a claim told twice); false if it is closed or held by another.
    pub(crate) fn bind(
        &self,
        session_id: &str,
        holder: &str,
        node: Option<&str>,
        setup: SetupData,
    ) -> bool {
        let mut state = self.lock();
        let Some(s) = state.sessions.get_mut(session_id) else {
            return false;
        };
        if s.info.state == SessionState::Closed {
            return false;
        }
        match &s.bound {
            Some(h) => h == holder,
            None => {
                s.bound = Some(holder.to_owned());
                s.bound_node = node.map(str::to_owned);
                if let Some(call) = &s.call {
                    call.send(CallInput::Claimed { setup });
                }
                true
            }
        }
    }

    /// Binds an open session of this node to `holder` in place of another holder whose media
    /// is not up (one the cluster's record no longer names), forgetting that one's token.
    /// False if it is closed, or if the media of its holder is up.
    pub(crate) fn take_over(
        &self,
        session_id: &str,
        holder: &str,
        node: Option<&str>,
        setup: SetupData,
    ) -> bool {
        let mut state = self.lock();
        let Some(s) = state.sessions.get_mut(session_id) else {
            return false;
        };
        if s.info.state == SessionState::Closed || s.media_attached {
            return false;
        }
        if s.bound.as_deref() != Some(holder) {
            s.bound = Some(holder.to_owned());
            s.bound_node = node.map(str::to_owned);
            s.ready = false;
            s.media_token = None;
            if let Some(call) = &s.call {
                call.send(CallInput::Claimed { setup });
            }
        }
        true
    }

    /// Unbinds a session of this node that its holder left (`RESUME` elsewhere), forgetting
    /// the media token minted for that holder. Sessions whose media is up stay held.
    pub(crate) fn unbind(&self, session_id: &str, holder: &str) -> bool {
        let mut state = self.lock();
        match state.sessions.get_mut(session_id) {
            Some(s) if s.bound.as_deref() == Some(holder) && !s.media_attached => {
                s.bound = None;
                s.bound_node = None;
                s.ready = false;
                s.media_token = None;
                true
            }
            _ => false,
        }
    }

    /// Open sessions of this node held by `holder` whose media is not up.
    pub(crate) fn unattached_of(&self, holder: &str) -> Vec<String> {
        self.lock()
            .sessions
            .values()
            .filter(|s| {
                s.bound.as_deref() == Some(holder)
                    && s.info.state == SessionState::Open
                    && !s.media_attached
            })
            .map(|s| s.info.id.clone())
            .collect()
    }

    /// `session.ready` from a holder on another node: the call and its connector, when the
    /// session is held by `holder` and its media is not up. Asked again (the answer to the
    /// first was lost, and the cluster's record made ready again), it answers again, for a
    /// fresh `call.in` whose token replaces the first.
    pub(crate) fn ready_for(
        &self,
        session_id: &str,
        holder: &str,
    ) -> Option<(CallHandle, Arc<str>)> {
        let mut state = self.lock();
        let s = state.sessions.get_mut(session_id)?;
        if s.bound.as_deref() != Some(holder)
            || s.info.state != SessionState::Open
            || s.media_attached
        {
            return None;
        }
        s.ready = true;
        Some((s.call.clone()?, s.connector.clone()))
    }

    /// The connector of a session of this node.
    pub(crate) fn connector_of(&self, session_id: &str) -> Option<Arc<str>> {
        Some(self.lock().sessions.get(session_id)?.connector.clone())
    }

    /// Whether a session of this node has ended; `None` if this node does not know it.
    pub(crate) fn is_closed(&self, session_id: &str) -> Option<bool> {
        Some(self.lock().sessions.get(session_id)?.info.state == SessionState::Closed)
    }

    /// A session of this node as it stands.
    pub(crate) fn info_of(&self, session_id: &str) -> Option<SessionInfo> {
        Some(self.lock().sessions.get(session_id)?.info.clone())
    }

    /// What the console shows of `connector` on this node: its control connections (by
    /// id, sorted) and the holder of each of its open sessions that has one.
    pub(crate) fn console_view(&self, connector: &str) -> ConsoleView {
        let state = self.lock();
        let mut controls: Vec<ControlView> = state
            .controls
            .iter()
            .filter(|(_, link)| &*link.connector == connector)
            .map(|(id, link)| ControlView {
                id: id.clone(),
                setup: link.setup,
                inbound_calls: link.inbound_calls,
            })
            .collect();
        controls.sort_by(|a, b| a.id.cmp(&b.id));
        let holders = state
            .sessions
            .values()
            .filter(|s| &*s.connector == connector && s.info.state == SessionState::Open)
            .filter_map(|s| Some((s.info.id.clone(), s.bound.clone()?)))
            .collect();
        ConsoleView { controls, holders }
    }

    /// Makes a running call reachable by its id.
    pub(crate) fn index_call(&self, call: &CallHandle) {
        self.lock()
            .by_call_id
            .insert(call.call_id.clone(), call.clone());
    }

    /// Forgets a finished call.
    pub(crate) fn unindex_call(&self, call_id: &str) {
        self.lock().by_call_id.remove(call_id);
    }

    /// Every running call.
    pub(crate) fn running_calls(&self) -> Vec<CallHandle> {
        self.lock().by_call_id.values().cloned().collect()
    }

    /// The running calls of `connector`.
    pub(crate) fn running_calls_of(&self, connector: &str) -> Vec<CallHandle> {
        self.lock()
            .by_call_id
            .values()
            .filter(|c| &*c.connector == connector)
            .cloned()
            .collect()
    }

    /// How many calls are running.
    pub(crate) fn running_call_count(&self) -> usize {
        self.lock().by_call_id.len()
    }

    /// A running call by id.
    pub(crate) fn call_by_id(&self, call_id: &str) -> Option<CallHandle> {
        self.lock().by_call_id.get(call_id).cloned()
    }

    /// `session.open`: claims a session for a control connection.
    pub(crate) fn claim(
        &self,
        sm_ws_id: &str,
        session_id: &str,
    ) -> Result<SessionInfo, ClaimError> {
        let mut state = self.lock();
        let Some(link) = state.controls.get(sm_ws_id).cloned() else {
            return Err(ClaimError::NotFound);
        };
        // Another connector's session is reported as not found: its existence is not ours to see.
        let Some(s) = state
            .sessions
            .get_mut(session_id)
            .filter(|s| s.connector == link.connector)
        else {
            return Err(ClaimError::NotFound);
        };
        if s.info.state == SessionState::Closed {
            return Err(ClaimError::Closed);
        }
        match &s.bound {
            Some(holder) if holder != sm_ws_id => {
                return Err(ClaimError::Busy {
                    bound_sm_ws_id: holder.clone(),
                });
            }
            Some(_) => {}
            None => {
                s.bound = Some(sm_ws_id.to_owned());
                if let Some(call) = &s.call {
                    call.send(CallInput::Claimed { setup: link.setup });
                }
            }
        }
        Ok(s.info.clone())
    }

    /// `session.ready`.
    pub(crate) fn ready(&self, sm_ws_id: &str, session_id: &str) -> ReadyOutcome {
        let mut state = self.lock();
        if !state.controls.contains_key(sm_ws_id) {
            return ReadyOutcome::NotOpen;
        }
        match state.sessions.get_mut(session_id) {
            Some(s)
                if s.bound.as_deref() == Some(sm_ws_id) && s.info.state == SessionState::Open =>
            {
                if s.ready {
                    return ReadyOutcome::Nothing;
                }
                s.ready = true;
                match &s.call {
                    Some(call) => ReadyOutcome::Call(call.clone()),
                    None => ReadyOutcome::Nothing,
                }
            }
            _ => ReadyOutcome::NotOpen,
        }
    }

    /// Records the media token handed to the session's holder in `call.in`.
    pub(crate) fn set_media_token(&self, session_id: &str, token: &str) {
        if let Some(s) = self.lock().sessions.get_mut(session_id) {
            s.media_token = Some(token.to_owned());
        }
    }

    /// Whether `token` is the one handed to the session's current holder.
    pub(crate) fn is_current_media_token(&self, session_id: &str, token: &str) -> bool {
        self.lock()
            .sessions
            .get(session_id)
            .and_then(|s| s.media_token.as_deref())
            .is_some_and(|t| t == token)
    }

    /// The media connection of a session's call is up (or down again).
    pub(crate) fn set_media_attached(&self, session_id: &str, attached: bool) {
        if let Some(s) = self.lock().sessions.get_mut(session_id) {
            s.media_attached = attached;
        }
    }

    /// Closes a session: tells its holder with `session.closed` and frees the call slot.
    /// Returns false if it was already closed.
    pub(crate) fn session_ended(&self, session_id: &str, reason: CloseReason) -> bool {
        self.end_session(session_id, reason).is_some()
    }

    /// [`Self::session_ended`], for a node of a cluster: `None` if it was already closed, else
    /// its holder on another node (`sm_ws_id`, node) if it had one, for that node to tell it.
    /// Read under the same lock as the close, so that a holder bound at the same moment is
    /// either refused or found here.
    pub(crate) fn end_session(
        &self,
        session_id: &str,
        reason: CloseReason,
    ) -> Option<Option<(String, String)>> {
        let mut state = self.lock();
        let State {
            controls,
            sessions,
            calls,
            closed,
            ..
        } = &mut *state;
        let s = sessions.get_mut(session_id)?;
        if s.info.state == SessionState::Closed {
            return None;
        }
        s.info.state = SessionState::Closed;
        s.info.closed_at = Some(unix_now());
        s.call = None;
        if let Some(count) = calls.get_mut(&s.connector) {
            *count = count.saturating_sub(1);
        }
        if let Some(link) = s.bound.as_ref().and_then(|id| controls.get(id)) {
            link.send(ServerFrame::SessionClosed {
                session_id: session_id.to_owned(),
                reason,
            });
        }
        let remote = s.bound.clone().zip(s.bound_node.clone());
        let kept = closed.entry(s.connector.clone()).or_default();
        kept.push_back(session_id.to_owned());
        while kept.len() > self.max_closed {
            if let Some(oldest) = kept.pop_front() {
                sessions.remove(&oldest);
            }
        }
        Some(remote)
    }

    /// Forgets closed sessions older than `keep_secs`, so the registry does not grow forever.
    pub(crate) fn prune_closed(&self, keep_secs: u64) {
        let now = unix_now();
        let mut state = self.lock();
        state.sessions.retain(|_, s| {
            s.info.state == SessionState::Open
                || s.info
                    .closed_at
                    .is_some_and(|t| now.saturating_sub(t) < keep_secs)
        });
        let State {
            sessions, closed, ..
        } = &mut *state;
        for kept in closed.values_mut() {
            kept.retain(|id| sessions.contains_key(id));
        }
        closed.retain(|_, kept| !kept.is_empty());
    }

    /// One page of a connector's sessions for the HTTP API, oldest first: `limit` sessions
    /// from `offset`.
    pub(crate) fn list(&self, query: &SessionQuery<'_>) -> SessionPage {
        let SessionQuery {
            connector,
            channel,
            remote_address,
            state,
            offset,
            limit,
        } = *query;
        // Sort references under the lock and clone only the page: the full list is bounded by
        // the call and closed-session limits, but copying all of it per request is not needed.
        let guard = self.lock();
        let mut matching: Vec<&SessionInfo> = guard
            .sessions
            .values()
            .filter(|s| &*s.connector == connector)
            .filter(|s| channel.is_none_or(|c| s.info.channel == c))
            .filter(|s| remote_address.is_none_or(|r| s.info.remote_address == r))
            .filter(|s| state.is_none_or(|st| s.info.state == st))
            .map(|s| &s.info)
            .collect();
        matching.sort_by(|a, b| a.opened_at.cmp(&b.opened_at).then_with(|| a.id.cmp(&b.id)));
        let total = matching.len();
        let items = matching
            .into_iter()
            .skip(offset)
            .take(limit)
            .cloned()
            .collect();
        let end = offset.saturating_add(limit);
        SessionPage {
            items,
            next_offset: (end < total).then_some(end),
        }
    }

    /// The call of an open session of `connector`, for HTTP close.
    pub(crate) fn call_of(&self, connector: &str, session_id: &str) -> Option<CallHandle> {
        self.lock()
            .sessions
            .get(session_id)
            .filter(|s| &*s.connector == connector && s.info.state == SessionState::Open)
            .and_then(|s| s.call.clone())
    }

    /// An open session of `connector` with this far party, for `session.create` idempotency.
    pub(crate) fn open_session_for(
        &self,
        connector: &str,
        channel: Channel,
        remote: &str,
    ) -> Option<String> {
        self.lock()
            .sessions
            .values()
            .find(|s| {
                &*s.connector == connector
                    && s.info.channel == channel
                    && s.info.state == SessionState::Open
                    && s.info.remote_address == remote
            })
            .map(|s| s.info.id.clone())
    }
}

fn offerable(s: &SessionRecord) -> bool {
    s.info.state == SessionState::Open && s.bound.is_none() && !s.media_attached && s.call.is_some()
}

fn notify(info: &SessionInfo, activity: Activity, now: u64) -> ServerFrame {
    ServerFrame::SessionNotify {
        session_id: info.id.clone(),
        channel: info.channel,
        remote_address: info.remote_address.clone(),
        local_address: info.local_address.clone(),
        activity,
        created_at: now,
    }
}

/// Offers a session to every connection of the connector that takes it.
fn broadcast(
    controls: &HashMap<String, ControlLink>,
    connector: &str,
    frame: &ServerFrame,
    inbound: bool,
) {
    for link in controls
        .values()
        .filter(|l| &*l.connector == connector && (l.inbound_calls || !inbound))
    {
        link.send(frame.clone());
    }
}

/// Adds a call session's record.
fn insert_session(
    state: &mut State,
    connector: &Arc<str>,
    info: SessionInfo,
    call: CallHandle,
    bound: Option<String>,
) {
    state.sessions.insert(
        info.id.clone(),
        SessionRecord {
            info,
            connector: connector.clone(),
            bound,
            bound_node: None,
            ready: false,
            media_attached: false,
            call: Some(call),
            media_token: None,
        },
    );
}
