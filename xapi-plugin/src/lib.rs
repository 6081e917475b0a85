//! # xenft-xapi: the control plane on XenAPI
//!
//! The XenAPI client (XML-RPC and JSON-RPC), the pool-wide protection registry kept in the
//! pool's and VMs' `other_config`, the xe-style `xenft` CLI, XenCenter custom fields and the
//! xapi host plugin. Everything an administrator or a script does goes through here.
