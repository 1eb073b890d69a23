//! The procedures this server runs on its leader (registered with the procedure
//! host's manager, so a new leader recovers and finishes them).
//!
//! | module | what |
//! | --- | --- |
//! | `ddl` | create/drop database, create/drop/alter/truncate/rename table |

pub mod ddl;
