//! `nats-connector`: not built yet; see the tracker. It will consume its source through
//! connector-sdk and invoke the functions subscribed to each topic.

fn main() {
    eprintln!("nats-connector is not implemented yet");
    std::process::exit(2);
}
