//! Groups of identical updates still waiting for their replica's lock, which
//! twins delivered in later batches join instead of queueing behind them.
//!
//! A replica's jobs run one after another. Without this, a busy replica's
//! backlog is a chain of twins, each costing a lock, a generation read and a
//! write although the first to run left the target up to date. A group stays
//! open until its lock is taken: every member was published before the group
//! reads the generations, so one run answers them all, as the newest member
//! (see `job::dispatch_batch`).

use crate::queue::incarnation::Incarnation;
use crate::queue::job::Delivered;
use crate::queue::waiting::{WaitReason, WaitSlot, Waiting};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// A replica's identical updates: relative path and source (the target is
/// the registry's own).
pub(super) type GroupKey = (String, String);

/// An open group's place in the registry, held by the task that runs it.
pub(super) struct GroupTicket {
    key: GroupKey,
    id: u64,
}

struct OpenGroup {
    id: u64,
    incarnation: Arc<Incarnation>,
    joiners: Vec<Delivered>,
    /// The joiners in the waiting gauge, until the lock is taken.
    counted: Vec<WaitSlot>,
}

/// One target's open groups.
pub(super) struct OpenGroups {
    inner: Mutex<Registry>,
    waiting: Arc<Waiting>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    groups: HashMap<GroupKey, OpenGroup>,
}

impl OpenGroups {
    /// Joined twins wait for the lock in `waiting`'s gauge.
    pub(super) fn new(waiting: Arc<Waiting>) -> Self {
        OpenGroups {
            inner: Mutex::new(Registry::default()),
            waiting,
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Nothing in here can be left half-written by a panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `d` to the open group of `key`, or gives it back when there is
    /// none (or it reads another incarnation of the stream, whose sequences
    /// do not compare). A joiner trades its intake for a rider's place
    /// while `riders` has one, so the intake goes on fetching.
    pub(super) fn join(
        &self,
        key: &GroupKey,
        mut d: Delivered,
        riders: &Arc<Semaphore>,
    ) -> Option<Delivered> {
        let mut registry = self.registry();
        match registry.groups.get_mut(key) {
            Some(g) if Arc::ptr_eq(&g.incarnation, &d.incarnation) => {
                if let Ok(rider) = riders.clone().try_acquire_owned() {
                    d.held = Some(rider);
                }
                g.joiners.push(d);
                g.counted
                    .push(self.waiting.counting(WaitReason::RepositoryLocked));
                None
            }
            _ => Some(d),
        }
    }

    /// Opens a group for `key` led by a job of `incarnation`; `None` when
    /// one is open already (the new one then runs on its own).
    pub(super) fn open(
        &self,
        key: GroupKey,
        incarnation: &Arc<Incarnation>,
    ) -> Option<GroupTicket> {
        let mut registry = self.registry();
        if registry.groups.contains_key(&key) {
            return None;
        }
        registry.next_id += 1;
        let id = registry.next_id;
        registry.groups.insert(
            key.clone(),
            OpenGroup {
                id,
                incarnation: incarnation.clone(),
                joiners: Vec::new(),
                counted: Vec::new(),
            },
        );
        Some(GroupTicket { key, id })
    }

    /// Closes the group: no job joins it any more. Returns those that did.
    pub(super) fn close(&self, ticket: GroupTicket) -> Vec<Delivered> {
        let mut registry = self.registry();
        match registry.groups.get(&ticket.key) {
            Some(g) if g.id == ticket.id => registry
                .groups
                .remove(&ticket.key)
                .map(|g| g.joiners)
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Takes the joiners so far out, leaving the group open, to be handed
    /// back with [`Self::put_back`] (their in-progress acks are sent
    /// between, without the registry held across an await).
    pub(super) fn take_joiners(&self, ticket: &GroupTicket) -> Vec<Delivered> {
        let mut registry = self.registry();
        match registry.groups.get_mut(&ticket.key) {
            Some(g) if g.id == ticket.id => std::mem::take(&mut g.joiners),
            _ => Vec::new(),
        }
    }

    /// Returns what [`Self::take_joiners`] took, ahead of those that joined
    /// since.
    pub(super) fn put_back(&self, ticket: &GroupTicket, mut joiners: Vec<Delivered>) {
        let mut registry = self.registry();
        if let Some(g) = registry.groups.get_mut(&ticket.key)
            && g.id == ticket.id
        {
            joiners.append(&mut g.joiners);
            g.joiners = joiners;
        }
    }
}
