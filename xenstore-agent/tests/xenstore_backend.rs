//! The Xen xenstore backend (xenstore-rs watches + our wire-protocol client for transactions)
//! against the in-process store served with the real xenstore protocol on a Unix socket.

use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use xenft_agent::xenstore::memory::MemStore;
use xenft_agent::xenstore::wire::serve_memstore;
use xenft_agent::xenstore::xen::XenXs;
use xenft_agent::xenstore::{list_domains, retry_transaction, XenStore, XsError, INTRODUCE_DOMAIN};

async fn next(rx: &mut tokio::sync::mpsc::Receiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("watch event in time")
        .expect("watch open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xen_backend_reads_writes_watches_and_retries_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xenstored.sock");
    let store = MemStore::new();
    let (stop_tx, stop) = watch::channel(false);
    let server = tokio::spawn(serve_memstore(
        store.clone(),
        UnixListener::bind(&sock).unwrap(),
        stop,
    ));
    // Each nextest test is its own process, so setting the variable is contained.
    std::env::set_var("XENSTORED_PATH", &sock);
    let xs = XenXs::connect().await.unwrap();

    xs.write(None, "/xenft/host", "h1").await.unwrap();
    assert_eq!(
        xs.read(None, "/xenft/host").await.unwrap().as_deref(),
        Some("h1")
    );
    assert_eq!(xs.read(None, "/xenft/none").await.unwrap(), None);
    assert_eq!(xs.directory(None, "/xenft").await.unwrap(), vec!["host"]);
    assert!(matches!(
        xs.directory(None, "/nothing").await,
        Err(XsError::NotFound(_))
    ));

    // Watch through xenstore-rs: fires on registration, then on changes below.
    let mut w = xs.watch("/xenft").await.unwrap();
    assert_eq!(next(&mut w).await, "/xenft");
    store
        .write(None, "/xenft/vm/web/state", "protected")
        .await
        .unwrap();
    assert!(next(&mut w).await.starts_with("/xenft"));
    let mut intro = xs.watch(INTRODUCE_DOMAIN).await.unwrap();
    assert_eq!(next(&mut intro).await, INTRODUCE_DOMAIN);
    store.introduce_domain(5, "web01");
    assert_eq!(next(&mut intro).await, INTRODUCE_DOMAIN);
    assert_eq!(list_domains(&xs).await.unwrap(), vec![5]);

    // Transactions over the wire: a conflict ends in EAGAIN, the retry loop redoes it.
    xs.write(None, "/xenft/counter", "1").await.unwrap();
    let t = xs.begin().await.unwrap();
    xs.read(Some(t), "/xenft/counter").await.unwrap();
    store.write(None, "/xenft/counter", "7").await.unwrap();
    xs.write(Some(t), "/xenft/counter", "2").await.unwrap();
    assert!(matches!(xs.end(t, true).await, Err(XsError::Again)));
    let xr = &xs;
    retry_transaction(xr, 3, |t| async move {
        let v: u32 = xr
            .read(Some(t), "/xenft/counter")
            .await?
            .unwrap_or_default()
            .parse()
            .unwrap_or(0);
        xr.write(Some(t), "/xenft/counter", &(v + 1).to_string())
            .await
    })
    .await
    .unwrap();
    assert_eq!(
        store.read(None, "/xenft/counter").await.unwrap().as_deref(),
        Some("8")
    );

    let _ = stop_tx.send(true);
    let _ = server.await;
}
