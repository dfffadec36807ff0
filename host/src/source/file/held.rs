//! What each file holds, without the objects themselves: the keys of its
//! Services and EndpointSlices (to delete what a file no longer holds) and
//! this node's Node, if the file has it. The objects go to the sync loop,
//! whose state keeps only their converted records (a parsed Service and
//! EndpointSlice are ~4 KiB together; kept here, they were a third of the
//! heap at 10k Services: docs/performance.md).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Node;

use super::parse::Objects;
use crate::model::ObjectKey;
use crate::source::{Kind, Object, SourceEvent};

type Key = (Kind, ObjectKey);

struct FileKeys {
    /// Sorted, without repeats.
    keys: Vec<Key>,
    /// The first Node of this file named as this node.
    node: Option<Node>,
}

/// The keys of every file's last good objects.
#[derive(Default)]
pub(super) struct Held {
    /// By path, ordered: the first file wins for the Node.
    files: BTreeMap<PathBuf, FileKeys>,
    /// How many files hold each key. More than one is a mistake in the
    /// directory; the file read last is in force, and when it drops the
    /// object, the others holding it are read again.
    holders: HashMap<Key, u32>,
}

/// What a file's change means for the sync loop.
pub(super) struct Update {
    pub batch: SourceEvent,
    /// Other files holding an object this file dropped: read them again,
    /// so that their version is in force.
    pub reread: Vec<PathBuf>,
}

impl Held {
    /// `path` was read and holds `objects` now.
    pub fn replace(&mut self, path: &Path, objects: Objects, node_name: &str) -> Update {
        let Objects {
            services,
            slices,
            nodes,
        } = objects;
        let mut keys: Vec<Key> = (services.iter())
            .map(|s| (Kind::Service, ObjectKey::of(&s.metadata)))
            .chain((slices.iter()).map(|s| (Kind::EndpointSlice, ObjectKey::of(&s.metadata))))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let node = (nodes.into_iter()).find(|n| n.metadata.name.as_deref() == Some(node_name));
        let before = self.files.remove(path).map(|f| f.keys).unwrap_or_default();
        for key in keys.iter().filter(|k| before.binary_search(k).is_err()) {
            let count = self.holders.entry(key.clone()).or_default();
            *count += 1;
            if *count == 2 {
                tracing::warn!(path = %path.display(), kind = ?key.0, object = %key.1, "object defined in more than one file; the file read last is in force");
            }
        }
        let dropped = before
            .into_iter()
            .filter(|k| keys.binary_search(k).is_err());
        let (deleted, reread) = self.release(path, dropped);
        let applied = (services.into_iter().map(Object::Service))
            .chain(slices.into_iter().map(Object::Slice))
            .collect();
        self.files
            .insert(path.to_path_buf(), FileKeys { keys, node });
        Update {
            batch: SourceEvent::Batch { deleted, applied },
            reread,
        }
    }

    /// `path` is gone; `None` if it held nothing known.
    pub fn remove(&mut self, path: &Path) -> Option<Update> {
        let file = self.files.remove(path)?;
        let (deleted, reread) = self.release(path, file.keys.into_iter());
        Some(Update {
            batch: SourceEvent::Batch {
                deleted,
                applied: Vec::new(),
            },
            reread,
        })
    }

    /// The files known, in order.
    pub fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.files.keys()
    }

    /// This node's Node, from the first file that has it.
    pub fn node(&self) -> Option<&Node> {
        self.files.values().find_map(|f| f.node.as_ref())
    }

    /// `path` no longer holds `keys`: those no other file holds are
    /// deleted; for the others, the files that hold them.
    fn release(
        &mut self,
        path: &Path,
        keys: impl Iterator<Item = Key>,
    ) -> (Vec<(Kind, ObjectKey)>, Vec<PathBuf>) {
        let (mut deleted, mut still_held) = (Vec::new(), Vec::new());
        for key in keys {
            match self.holders.get_mut(&key) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    still_held.push(key);
                }
                _ => {
                    self.holders.remove(&key);
                    deleted.push(key);
                }
            }
        }
        // Only with objects in more than one file: a walk of the files.
        let reread = (self.files.iter())
            .filter(|(p, f)| {
                p.as_path() != path && still_held.iter().any(|k| f.keys.binary_search(k).is_ok())
            })
            .map(|(p, _)| p.clone())
            .collect();
        (deleted, reread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(text: &str) -> Objects {
        super::super::parse_objects(text).unwrap()
    }

    fn svc(name: &str) -> String {
        format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: 80}}]}}\n---\n"
        )
    }

    fn deleted(update: &Update) -> Vec<String> {
        let SourceEvent::Batch { deleted, .. } = &update.batch else {
            panic!("not a batch")
        };
        deleted.iter().map(|(_, k)| k.name.clone()).collect()
    }

    #[test]
    fn a_dropped_object_is_deleted_unless_another_file_holds_it() {
        let mut held = Held::default();
        let (a, b) = (Path::new("a.yaml"), Path::new("b.yaml"));
        held.replace(a, objects(&(svc("x") + &svc("y"))), "n");
        held.replace(b, objects(&svc("y")), "n");
        let update = held.replace(a, objects(&svc("x")), "n");
        assert!(deleted(&update).is_empty(), "y is still in b.yaml");
        assert_eq!(update.reread, [PathBuf::from("b.yaml")]);
        let update = held.remove(b).unwrap();
        assert_eq!(deleted(&update), ["y"]);
        assert!(update.reread.is_empty());
        assert_eq!(deleted(&held.remove(a).unwrap()), ["x"]);
        assert!(held.holders.is_empty());
    }

    #[test]
    fn the_first_file_with_this_node_gives_the_node() {
        let mut held = Held::default();
        let node = |zone: &str| {
            objects(&format!(
                "kind: Node\nmetadata: {{name: n, labels: {{zone: {zone}}}}}\n---\nkind: Node\nmetadata: {{name: other}}\n"
            ))
        };
        held.replace(Path::new("b.yaml"), node("b"), "n");
        held.replace(Path::new("a.yaml"), node("a"), "n");
        let zone = |held: &Held| {
            held.node().and_then(|n| n.metadata.labels.clone()).unwrap()["zone"].clone()
        };
        assert_eq!(zone(&held), "a");
        held.remove(Path::new("a.yaml"));
        assert_eq!(zone(&held), "b");
        held.remove(Path::new("b.yaml"));
        assert!(held.node().is_none());
    }
}
