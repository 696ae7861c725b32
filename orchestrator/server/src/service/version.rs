//! API versions: what the server speaks, and the interceptor that enforces it.

use drover_proto::v1 as pb;
use tonic::{Request, Response, Status};

/// The oldest and newest `MAJOR.MINOR` this server speaks.
pub const MIN_API_VERSION: (u32, u32) = (1, 0);
pub const MAX_API_VERSION: (u32, u32) = (1, 0);

fn fmt((major, minor): (u32, u32)) -> String {
    format!("{major}.{minor}")
}

fn parse(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Refuses requests whose `drover-api-version` this server does not speak. A request
/// without the header is taken as the newest version (handy for grpcurl).
#[allow(clippy::result_large_err)]
pub fn check_api_version(req: Request<()>) -> Result<Request<()>, Status> {
    let Some(raw) = req.metadata().get(drover_proto::API_VERSION_HEADER) else { return Ok(req) };
    let text = raw.to_str().unwrap_or("");
    let Some(v) = parse(text) else {
        return Err(Status::invalid_argument(format!(
            "header {}: {text:?} is not MAJOR.MINOR; send e.g. {}",
            drover_proto::API_VERSION_HEADER,
            fmt(MAX_API_VERSION)
        )));
    };
    let range = format!("{} to {}", fmt(MIN_API_VERSION), fmt(MAX_API_VERSION));
    if v > MAX_API_VERSION {
        return Err(Status::invalid_argument(format!(
            "API version {} is newer than this server supports ({range}); upgrade the orchestrator or use an older client",
            fmt(v)
        )));
    }
    if v < MIN_API_VERSION {
        return Err(Status::invalid_argument(format!(
            "API version {} is older than this server supports ({range}); upgrade the client",
            fmt(v)
        )));
    }
    Ok(req)
}

/// `drover.v1.VersionService`.
pub struct VersionApi;

#[tonic::async_trait]
impl pb::version_service_server::VersionService for VersionApi {
    async fn get_version(
        &self,
        _req: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::GetVersionResponse>, Status> {
        Ok(Response::new(pb::GetVersionResponse {
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            min_api_version: fmt(MIN_API_VERSION),
            max_api_version: fmt(MAX_API_VERSION),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(v: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut().insert(drover_proto::API_VERSION_HEADER, v.parse().unwrap());
        r
    }

    #[test]
    fn versions_outside_the_range_are_refused_with_the_range() {
        assert!(check_api_version(with("1.0")).is_ok());
        assert!(check_api_version(Request::new(())).is_ok());
        let too_new = check_api_version(with("2.0")).unwrap_err();
        assert_eq!(too_new.code(), tonic::Code::InvalidArgument);
        assert!(
            too_new.message().contains("newer") && too_new.message().contains("1.0 to 1.0"),
            "{}",
            too_new.message()
        );
        assert!(check_api_version(with("0.9")).unwrap_err().message().contains("older"));
        assert!(check_api_version(with("one")).unwrap_err().message().contains("MAJOR.MINOR"));
    }
}
