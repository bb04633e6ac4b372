//! Object-store backends selected by URL.
use std::sync::Arc;

use object_store::ObjectStore;

use crate::{Result, StoreError};

/// Opens the object store behind `url`, creating the folder, container or bucket if missing.
///
/// `file:///abs/dir` is a local folder. (`az://` and `s3://` follow.)
pub async fn open(url: &str) -> Result<Arc<dyn ObjectStore>> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(StoreError::Url(url.into()));
        }
        std::fs::create_dir_all(path).map_err(|e| StoreError::Backend {
            url: url.into(),
            source: object_store::Error::Generic {
                store: "local",
                source: Box::new(e),
            },
        })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(path).map_err(|e| {
            StoreError::Backend {
                url: url.into(),
                source: e,
            }
        })?;
        return Ok(Arc::new(fs));
    }
    Err(StoreError::Url(url.into()))
}
