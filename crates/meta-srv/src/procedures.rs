//! The procedures this server runs on its leader (registered with the procedure
//! host's manager, so a new leader recovers and finishes them).
//!
//! | module | what |
//! | --- | --- |
//! | `ddl` | create/drop database, create/drop/alter/truncate/rename table |
//! | `region` | region migration, and the checks of a request to move regions |
//! | `route` | the range route catalog: split, merge, move |

pub mod ddl;
pub mod region;
pub mod route;
