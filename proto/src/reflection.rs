//! Server reflection, so that grpcurl, Postman and Evans find their way in: both
//! `grpc.reflection.v1` and the older `v1alpha` (which many clients still ask), each
//! listing exactly the services the server serves, health and reflection included.

use tonic_reflection::server::{Builder, Error, v1, v1alpha};

/// The names every server adds to its own: health and both reflection versions.
pub const COMMON: [&str; 3] =
    ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

fn builder<'b>(served: &[&str]) -> Builder<'b> {
    let mut b = Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for name in served.iter().chain(COMMON.iter()) {
        b = b.with_service_name(*name);
    }
    b
}

/// The two reflection services of a server that serves `served` (fully qualified names,
/// e.g. `drover.v1.VolumeService`) besides health and reflection.
#[allow(clippy::type_complexity)]
pub fn services(
    served: &[&str],
) -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    Error,
> {
    Ok((builder(served).build_v1()?, builder(served).build_v1alpha()?))
}
