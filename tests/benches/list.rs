//! Listing many groups of one project page by page on etcd: the time of each page from
//! the first to the last, which should stay flat (a page is one bounded range read of the
//! project's index and its records, wherever it starts).
//!
//! `DROVER_BENCH_GROUPS` (100,000) groups are made in project `big` through the API, 32
//! calls in flight, with one group in project `other` for every ten, made in between so
//! the two projects' records interleave in the store. Then `ListGroups` pages through
//! `big` at the largest page (1,000), `DROVER_BENCH_PASSES` (2) times. Printed: the time
//! to make the groups, each pass's page times by tenth of the listing (median of each),
//! the last tenth's median over the first tenth's, and that every group came back once.
//!
//! Then the audit trail the creations left (one record per call, over 100,000) is paged
//! through at 1,000 records a page, newest to oldest, with the same figures; and the
//! refused calls are asked for (there are none: every creation succeeded), which reads
//! the whole trail a bounded stretch per call. Printed: the calls that took and their
//! times.
//!
//! Run with `cargo bench -p drover-tests --bench list`.

use std::time::Instant;

use drover_proto::v1 as pb;
use drover_tests::{Cluster, Etcd, StoreChoice};

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("DROVER_BENCH_GROUPS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let passes: usize = std::env::var("DROVER_BENCH_PASSES").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let etcd = Etcd::start().await;
    let cluster = Cluster::start(StoreChoice::Etcd(&etcd), &[]).await;
    let c = cluster.clients().await;

    let others = n / 10;
    let started = Instant::now();
    // Every eleventh group is one of `other`'s.
    drover_tests::bulk_groups(&c, n + others, 32, move |i| {
        let project = if i % 11 == 10 && i / 11 < others { "other" } else { "big" };
        (format!("g{i:06}"), project.to_string())
    })
    .await;
    let made = started.elapsed().as_secs_f64();
    println!("{} groups made through the API in {made:.1} s ({:.0}/s)", n + others, (n + others) as f64 / made);

    let mut groups = c.groups.clone();
    for pass in 1..=passes {
        let (mut marker, mut times, mut seen) = (String::new(), Vec::new(), std::collections::HashSet::new());
        let pass_started = Instant::now();
        loop {
            let t = Instant::now();
            let page = groups
                .list_groups(pb::ListGroupsRequest { project: "big".into(), limit: 1000, marker: marker.clone() })
                .await
                .unwrap()
                .into_inner();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            for g in &page.groups {
                assert_eq!(g.project, "big", "a group of another project in big's listing");
                assert!(seen.insert(g.id.clone()), "group {} listed twice", g.id);
            }
            if page.next_marker.is_empty() {
                break;
            }
            marker = page.next_marker;
        }
        let total = pass_started.elapsed().as_secs_f64();
        assert_eq!(seen.len(), n, "every group of big listed once, and no other");
        println!(
            "pass {pass}: {} pages, all {n} groups of big once, none of other's {others}, in {total:.1} s",
            times.len()
        );
        by_tenth(&times);
    }

    let mut audit = c.audit.clone();
    for refused_only in [false, true] {
        let (mut marker, mut times, mut records) = (String::new(), Vec::new(), 0);
        let started = Instant::now();
        loop {
            let t = Instant::now();
            let req = pb::ListAuditRequest { refused_only, limit: 1000, marker: marker.clone(), ..Default::default() };
            let page = audit.list_audit(req).await.unwrap().into_inner();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            records += page.records.len();
            if page.next_marker.is_empty() {
                break;
            }
            marker = page.next_marker;
        }
        let what = if refused_only { "refused calls only" } else { "every record" };
        println!(
            "audit trail, {what}: {records} records in {} calls, {:.1} s",
            times.len(),
            started.elapsed().as_secs_f64()
        );
        if refused_only {
            let mut sorted = times.clone();
            println!("  call time median {:.1} ms, max {:.1} ms", median(&mut sorted), sorted[sorted.len() - 1]);
        } else {
            assert!(records >= n, "every creation left a record ({records})");
            by_tenth(&times);
        }
    }
}

/// Prints page times by tenth of a listing (median of each), and the last over the first.
fn by_tenth(times: &[f64]) {
    let tenth = times.len().div_ceil(10);
    let medians: Vec<f64> = times.chunks(tenth).map(|c| median(&mut c.to_vec())).collect();
    println!(
        "  page time by tenth of the listing, median ms: {}",
        medians.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>().join(" ")
    );
    println!(
        "  first page {:.1} ms, last page {:.1} ms; last tenth / first tenth = {:.2}",
        times[0],
        times[times.len() - 1],
        medians[medians.len() - 1] / medians[0]
    );
}
