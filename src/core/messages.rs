//! Journal `MESSAGE_ID`s, one per lifecycle event, so `journalctl MESSAGE_ID=...` finds every
//! occurrence. Never change a published id.

pub const WORKSPACE_CREATED: &str = "52d12c4aa538474f87b33f983311001a";
pub const WORKSPACE_UPDATED: &str = "fe5a5b79b6214369a62853e48e324d35";
pub const WORKSPACE_DESTROYED: &str = "819011e31a6147de918401f3d54b1c99";
pub const EXEC_FINISHED: &str = "67a62a897fde43ffa65994fbd1d33813";
pub const RECORD_CORRUPT: &str = "4168556b63f447afb5dcaf1568d91b57";
pub const SERVICE_STARTED: &str = "d39595f1898747ff9b5c3a789809fa6f";
pub const CONFIG_RELOADED: &str = "943c15cf13b44e56abc0552560cc527b";
/// Copy-on-write trees cannot be made with the configured directories: every create unpacks
/// the whole base. `REASON` says why, `FIX` what to do.
pub const COPY_ON_WRITE_OFF: &str = "40106655bb7e4612bf0699520ecaaf0a";
