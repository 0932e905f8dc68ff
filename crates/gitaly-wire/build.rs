//! Compiles the workspace's `proto/` into Rust with a pure-Rust protobuf
//! compiler (protox), so building needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../proto";
    let files = [
        "gitaly/shared.proto",
        "gitaly/repository.proto",
        "gitaly/objectpool.proto",
        "gitaly/ref.proto",
        "grpc/health/v1/health.proto",
    ]
    .map(|f| format!("{root}/{f}"));
    let descriptors = protox::compile(files, [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed={root}");
    Ok(())
}
