//! etcd's `Cluster` service mapped onto Metasrv's membership. A member's peer and
//! client URL are the same (`http://` and its one gRPC address); its name is
//! `member-{id}`. Members are added as learners, and promoted at once when added as
//! voters (etcd adds a voter directly); the new member's id is the next free one.
//! Changes run at the leader: a member that does not lead forwards them.

use std::sync::Arc;
use std::time::Duration;

use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::cluster_client::ClusterClient;
use tonic::{Request, Response, Status};

use super::Etcd;
use super::forward::{Route, onward};
use super::status::{
    LEARNER_NOT_READY, MEMBER_BAD_URLS, MEMBER_EXISTS, MEMBER_NOT_FOUND, MEMBER_NOT_LEARNER, status,
};
use crate::raft::driver::{Membership, MembershipChange};

/// How long a membership change may take.
const CHANGE_PATIENCE: Duration = Duration::from_secs(10);

/// etcd's Cluster service of one member.
pub struct ClusterService {
    etcd: Arc<Etcd>,
}

impl ClusterService {
    /// The service over the member's shared etcd state.
    pub fn new(etcd: Arc<Etcd>) -> Self {
        ClusterService { etcd }
    }

    fn header(&self) -> Option<epb::ResponseHeader> {
        self.etcd
            .responder()
            .header(self.etcd.backend.local_revision())
    }

    /// etcd's view of a member.
    fn member(&self, id: u64, learner: bool) -> epb::Member {
        let urls = self
            .etcd
            .members
            .addr(id)
            .map(|addr| vec![format!("http://{addr}")])
            .unwrap_or_default();
        epb::Member {
            id,
            name: format!("member-{id}"),
            peer_ur_ls: urls.clone(),
            client_ur_ls: urls,
            is_learner: learner,
        }
    }

    fn members(&self, membership: &Membership) -> Vec<epb::Member> {
        membership
            .voters
            .iter()
            .map(|id| self.member(*id, false))
            .chain(membership.learners.iter().map(|id| self.member(*id, true)))
            .collect()
    }

    async fn change(&self, change: MembershipChange) -> Result<Membership, Status> {
        self.etcd
            .driver
            .change_membership(change, CHANGE_PATIENCE)
            .await
            .map_err(change_status)
    }
}

/// etcd's text for a refused membership change, where etcd has one.
fn change_status(err: common_meta::Error) -> Status {
    use common_meta::error::MembershipRefusal as R;
    match &err {
        common_meta::Error::MembershipRefused { refusal, .. } => match refusal {
            R::NotLearner => MEMBER_NOT_LEARNER.status(),
            R::Unknown => MEMBER_NOT_FOUND.status(),
            R::Exists => MEMBER_EXISTS.status(),
            R::LearnerBehind => LEARNER_NOT_READY.status(),
            R::Busy | R::Leader | R::LastVoter => status(err),
        },
        _ => status(err),
    }
}

/// The `host:port` of the first peer URL (`http://host:port`, or `host:port`).
fn address(urls: &[String]) -> Result<String, Status> {
    let url = urls.first().ok_or_else(|| MEMBER_BAD_URLS.status())?;
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url)
        .trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(rest.to_string())
        }
        _ => Err(MEMBER_BAD_URLS.status()),
    }
}

#[tonic::async_trait]
impl epb::cluster_server::Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<epb::MemberAddRequest>,
    ) -> Result<Response<epb::MemberAddResponse>, Status> {
        let addr = address(&request.get_ref().peer_ur_ls)?;
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return ClusterClient::new(channel)
                .member_add(onward(request))
                .await;
        }
        let learner = request.into_inner().is_learner;
        let taken = self.etcd.members.all();
        if taken.values().any(|known| *known == addr) {
            return Err(Status::failed_precondition(
                "etcdserver: Peer URLs already exists",
            ));
        }
        let id = taken.keys().max().copied().unwrap_or(0) + 1;
        let mut membership = self
            .change(MembershipChange::AddLearner { id, addr })
            .await?;
        if !learner {
            membership = self.change(MembershipChange::Promote { id }).await?;
        }
        Ok(Response::new(epb::MemberAddResponse {
            header: self.header(),
            member: Some(self.member(id, learner)),
            members: self.members(&membership),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<epb::MemberRemoveRequest>,
    ) -> Result<Response<epb::MemberRemoveResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return ClusterClient::new(channel)
                .member_remove(onward(request))
                .await;
        }
        let id = request.into_inner().id;
        let membership = self.change(MembershipChange::Remove { id }).await?;
        Ok(Response::new(epb::MemberRemoveResponse {
            header: self.header(),
            members: self.members(&membership),
        }))
    }

    /// A member's address is fixed when it is added: remove it and add it again.
    async fn member_update(
        &self,
        _request: Request<epb::MemberUpdateRequest>,
    ) -> Result<Response<epb::MemberUpdateResponse>, Status> {
        Err(Status::unimplemented(
            "etcdserver: Metasrv cannot change a member's URLs; remove the member and add it again",
        ))
    }

    async fn member_list(
        &self,
        request: Request<epb::MemberListRequest>,
    ) -> Result<Response<epb::MemberListResponse>, Status> {
        if request.get_ref().linearizable
            && let Route::Leader(channel) = self.etcd.forward.route(&request).await?
        {
            return ClusterClient::new(channel)
                .member_list(onward(request))
                .await;
        }
        let raft = self.etcd.driver.status().await.map_err(status)?;
        let membership = Membership {
            voters: raft.voters,
            learners: raft.learners,
        };
        Ok(Response::new(epb::MemberListResponse {
            header: self.header(),
            members: self.members(&membership),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<epb::MemberPromoteRequest>,
    ) -> Result<Response<epb::MemberPromoteResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return ClusterClient::new(channel)
                .member_promote(onward(request))
                .await;
        }
        let id = request.into_inner().id;
        let membership = self.change(MembershipChange::Promote { id }).await?;
        Ok(Response::new(epb::MemberPromoteResponse {
            header: self.header(),
            members: self.members(&membership),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_give_the_member_address() {
        let ok = |url: &str| address(&[url.to_string()]).unwrap();
        assert_eq!(ok("http://127.0.0.1:3002"), "127.0.0.1:3002");
        assert_eq!(ok("https://meta-2.internal:3002/"), "meta-2.internal:3002");
        assert_eq!(ok("10.0.0.5:2380"), "10.0.0.5:2380");
        for bad in ["", "http://host", "http://:3002", "http://host:port"] {
            let status = address(&[bad.to_string()]).unwrap_err();
            assert_eq!(status.message(), MEMBER_BAD_URLS.text(), "{bad:?}");
        }
        assert!(address(&[]).is_err());
    }
}
