//! Compiles `schema/http_log.capnp` into Rust with capnpc (needs the `capnp` compiler on PATH).

fn main() {
    println!("cargo:rerun-if-changed=schema/http_log.capnp");
    capnpc::CompilerCommand::new()
        .src_prefix("schema")
        .file("schema/http_log.capnp")
        .run()
        .expect(
            "compiling schema/http_log.capnp failed: is the `capnp` compiler installed \
             (Debian package `capnproto`, installed by scripts/install-build-deps.sh)?",
        );
}
