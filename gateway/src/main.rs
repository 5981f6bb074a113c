//! `gateway`: the bundled OpenFaaS-compatible gateway (being built).

fn main() {
    eprintln!("gateway is not implemented yet");
    std::process::exit(2);
}
