//! Compiles `proto/` into Rust with a pure-Rust protobuf compiler (protox), so
//! building needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/gitaly/shared.proto",
        "proto/gitaly/repository.proto",
        "proto/gitaly/objectpool.proto",
        "proto/gitaly/ref.proto",
        "proto/grpc/health/v1/health.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
