//! The xapi host plugin, installed as `/etc/xapi.d/plugins/xenft`. xapi runs it with one
//! argument (an XML-RPC methodCall) and reads the methodResponse from stdout; see
//! [`xenft_xapi::plugin`]. Logs go to stderr (xapi keeps them in its log on failure).

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XENFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let url = std::env::var("XENFT_URL").ok();
    let out = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(xenft_xapi::plugin::handle(&argv, url.as_deref())),
        Err(e) => xenft_xapi::xmlrpc::encode_response(&xenft_xapi::client::failure_envelope(
            xenft_xapi::plugin::XAPI,
            &[format!("cannot start runtime: {e}")],
        )),
    };
    print!("{out}");
}
