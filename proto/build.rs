//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler), so building
//! needs nothing but cargo: no system protoc.
fn main() {
    let files = [
        "proto/system.proto",
        "proto/auth.proto",
        "proto/message.proto",
        "proto/friend.proto",
        "proto/group.proto",
        "proto/presence.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"]).expect("compile .proto files");
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(fds)
        .expect("generate Rust from .proto files");
}
