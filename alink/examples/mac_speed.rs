//! Measures keyed-BLAKE3 throughput of the frame MAC on this machine (a ceiling for the link).
fn main() {
    let key = xenft_alink::frame::keyed(b"0123456789abcdef0123456789abcdef");
    let buf = vec![7u8; 1024 * 1024];
    let h = [0u8; 20];
    let t = std::time::Instant::now();
    let mut x = 0u8;
    for _ in 0..512 {
        x ^= xenft_alink::frame::mac(&key, &h, &buf)[0];
    }
    let s = t.elapsed().as_secs_f64();
    println!("frame MAC (keyed BLAKE3): {:.0} MiB/s ({x})", 512.0 / s);
}
