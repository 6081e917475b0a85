//! What a node writes to its status file: the agent's view, the A-link, the VM's components.

use xenft_checkpoint::engine::primary::Phase as CkptPhase;

use crate::now_ms;
use crate::state::{AgentView, CheckpointView, LinkView, NetView, NodeRole, NodeStatus, PathView};

use super::vm::{Guest, Vm};
use super::{agent_timing, json_word, lock, Node, VM};

impl Node {
    pub(super) fn agent_view(&self) -> AgentView {
        let Some(hub) = self.hub.get() else {
            return AgentView::default();
        };
        let s = hub.snapshot();
        let mut v = AgentView {
            quorum_ok: s.quorum.iter().any(|q| q.1),
            quorum_requests: s.counters.quorum_requests,
            expected_failover_ms: {
                let t = agent_timing(self.cfg.product_timing);
                t.peer_dead_ms.max(t.lease_ms) + t.heartbeat_ms
            },
            ..AgentView::default()
        };
        if let Some(p) = s.peers.first() {
            v.peer_silent = p.silent;
            v.paths = p
                .paths
                .iter()
                .map(|(id, up, _)| (id.to_string(), *up))
                .collect();
        }
        if let Some(vm) = s.vms.iter().find(|v| v.record.vm.as_str() == VM) {
            v.phase = json_word(&vm.record.phase);
            v.primary = vm.record.primary.to_string();
            v.generation = vm.record.generation;
            v.local = json_word(&vm.local);
            v.lease_valid = vm.lease_valid;
        }
        v
    }

    pub(super) fn link_view(&self) -> LinkView {
        let st = self.agent_link.status();
        LinkView {
            connected: st.connected,
            paths: st
                .paths
                .iter()
                .map(|p| PathView {
                    up: p.up,
                    rtt_ms: p.rtt_ms,
                    connects: p.connects,
                })
                .collect(),
        }
    }

    pub(super) fn status(&self) -> NodeStatus {
        let mut st = NodeStatus {
            host: self.me(),
            pid: std::process::id(),
            updated_ms: now_ms(),
            role: NodeRole::Standby,
            serving: false,
            service_count: 0,
            guest_pid: None,
            link: self.link_view(),
            checkpoint: CheckpointView::default(),
            disk_state: String::new(),
            disk: serde_json::Value::Null,
            net: self.netback_counters().map(|c| NetView {
                mode: json_word(&c.mode),
                redirecting: c.redirect.redirecting,
                serving_peer: c.redirect.serving_peer,
                uplink_up: c.redirect.uplink_up,
            }),
            takeover: None,
            agent: self.agent_view(),
        };
        let vm = lock(&self.vm);
        match &*vm {
            Vm::Standby => {}
            Vm::Replica(rep) => {
                st.role = NodeRole::Secondary;
                let s = rep.sec.status();
                st.checkpoint = CheckpointView {
                    phase: "receiving".into(),
                    committed_epoch: s.committed_epoch.unwrap_or(0),
                    ..CheckpointView::default()
                };
                (st.disk_state, st.disk) = self.disk_view(true);
            }
            Vm::Running(r) => {
                st.role = if r.paused {
                    NodeRole::Fenced
                } else {
                    NodeRole::Primary
                };
                st.serving = !r.paused;
                st.service_count = r.svc.count();
                st.guest_pid = r.guest_pid;
                st.takeover.clone_from(&r.takeover);
                st.checkpoint = match &r.guest {
                    Guest::Protected(p) => {
                        let p = p.status();
                        CheckpointView {
                            phase: match &p.phase {
                                CkptPhase::Failed(e) => format!("failed: {e}"),
                                other => format!("{other:?}").to_lowercase(),
                            },
                            epoch: p.epoch,
                            committed_epoch: p.committed_epoch,
                            lag_bytes: p.lag_bytes,
                            last_commit_age_ms: p
                                .last_commit_age
                                .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
                        }
                    }
                    _ => CheckpointView {
                        phase: "unprotected".into(),
                        ..CheckpointView::default()
                    },
                };
                (st.disk_state, st.disk) = self.disk_view(r.out_link.is_some());
            }
        }
        st
    }

    pub(super) fn write_status(&self) {
        let st = self.status();
        if let Err(e) = self
            .cfg
            .dir
            .write_json(&self.cfg.dir.status_file(self.me()), &st)
        {
            tracing::warn!(error = %e, "cannot write status");
        }
    }
}
