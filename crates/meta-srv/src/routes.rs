//! The range route catalog on the server: what `GET /routes` and `metactl route` show. A new cluster's
//! catalog is the built-in first version (one `Active` route over the whole key space
//! on `[routes] initial_group`), so nothing is written until it first changes.

use common_meta::model::route::{RouteCatalog, RouteDescriptor, RouteState};
use serde::Serialize;

/// One route as `GET /routes` shows it: keys as text (lossy) and as hex.
#[derive(Debug, Serialize)]
pub struct RouteView {
    /// Its id.
    pub route_id: u64,
    /// First key, as UTF-8 text (lossy).
    pub start: String,
    /// First key, hex.
    pub start_hex: String,
    /// End key as text; `null` for no end.
    pub end: Option<String>,
    /// End key, hex; `null` for no end.
    pub end_hex: Option<String>,
    /// The group owning the range.
    pub group_id: u64,
    /// Its state.
    pub state: RouteState,
    /// The route it came from.
    pub parent_route_id: Option<u64>,
}

/// The catalog as `GET /routes` shows it.
#[derive(Debug, Serialize)]
pub struct CatalogView {
    /// The catalog's version.
    pub version: u64,
    /// The routes, sorted by start.
    pub routes: Vec<RouteView>,
}

use common_meta::hex::encode as hex;

impl From<&RouteDescriptor> for RouteView {
    fn from(r: &RouteDescriptor) -> Self {
        RouteView {
            route_id: r.route_id,
            start: String::from_utf8_lossy(&r.start).into_owned(),
            start_hex: hex(&r.start),
            end: r
                .end
                .as_deref()
                .map(|e| String::from_utf8_lossy(e).into_owned()),
            end_hex: r.end.as_deref().map(hex),
            group_id: r.group_id,
            state: r.state,
            parent_route_id: r.parent_route_id,
        }
    }
}

impl RouteView {
    /// One line for people: `ID [START, END) group G STATE (from PARENT)`, keys quoted
    /// (`+inf` for no end).
    pub fn line(&self) -> String {
        let end = self
            .end
            .as_ref()
            .map_or_else(|| "+inf".to_string(), |e| format!("{e:?}"));
        let parent = self
            .parent_route_id
            .map(|p| format!(" (from {p})"))
            .unwrap_or_default();
        format!(
            "{} [{:?}, {end}) group {} {:?}{parent}",
            self.route_id, self.start, self.group_id, self.state
        )
    }
}

impl From<&RouteCatalog> for CatalogView {
    fn from(c: &RouteCatalog) -> Self {
        CatalogView {
            version: c.version,
            routes: c.routes.iter().map(RouteView::from).collect(),
        }
    }
}
