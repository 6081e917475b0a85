//! The xapi host plugin, installed as `/etc/xapi.d/plugins/xenft` (see `xenft_xapi::plugin`).
fn main() {}
