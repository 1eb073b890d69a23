//! The range route catalog's wire types and the domain's, both ways.

use meta_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::model::route::{RouteDescriptor, RouteState};

impl From<RouteState> for pb::RouteState {
    fn from(state: RouteState) -> Self {
        match state {
            RouteState::Active => pb::RouteState::Active,
            RouteState::WriteFenced => pb::RouteState::WriteFenced,
            RouteState::MigratingSource => pb::RouteState::MigratingSource,
            RouteState::MigratingTarget => pb::RouteState::MigratingTarget,
        }
    }
}

impl TryFrom<pb::RouteState> for RouteState {
    type Error = Error;

    fn try_from(state: pb::RouteState) -> Result<Self> {
        match state {
            pb::RouteState::Active => Ok(RouteState::Active),
            pb::RouteState::WriteFenced => Ok(RouteState::WriteFenced),
            pb::RouteState::MigratingSource => Ok(RouteState::MigratingSource),
            pb::RouteState::MigratingTarget => Ok(RouteState::MigratingTarget),
            pb::RouteState::Unspecified => Err(Error::invalid_argument("route state unspecified")),
        }
    }
}

impl From<&RouteDescriptor> for pb::Route {
    fn from(route: &RouteDescriptor) -> Self {
        pb::Route {
            route_id: route.route_id,
            start: route.start.clone(),
            end: route.end.clone(),
            group_id: route.group_id,
            state: pb::RouteState::from(route.state).into(),
            parent_route_id: route.parent_route_id,
        }
    }
}

impl TryFrom<pb::Route> for RouteDescriptor {
    type Error = Error;

    fn try_from(route: pb::Route) -> Result<Self> {
        let state = pb::RouteState::try_from(route.state)
            .map_err(|_| Error::invalid_argument(format!("unknown route state {}", route.state)))?;
        Ok(RouteDescriptor {
            route_id: route.route_id,
            start: route.start,
            end: route.end,
            group_id: route.group_id,
            state: state.try_into()?,
            parent_route_id: route.parent_route_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_cross_the_wire_unchanged() {
        for state in [
            RouteState::Active,
            RouteState::WriteFenced,
            RouteState::MigratingSource,
            RouteState::MigratingTarget,
        ] {
            let route = RouteDescriptor {
                route_id: 7,
                start: b"a".to_vec(),
                end: Some(b"m".to_vec()),
                group_id: 3,
                state,
                parent_route_id: Some(2),
            };
            assert_eq!(
                RouteDescriptor::try_from(pb::Route::from(&route)).unwrap(),
                route
            );
        }
        let bad = pb::Route {
            state: 99,
            ..Default::default()
        };
        assert!(
            RouteDescriptor::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("unknown route state 99")
        );
    }
}
