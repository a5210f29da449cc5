//! The store's inode numbers. Below the root, a directory per image reference, in it a
//! directory per layer digest holding `diff/`, `info` and `blob` (containers/storage's
//! additional layer store layout). The store's own nodes get small numbers, handed out on
//! first lookup and never reused. Each (image, layer) pair whose `diff` was looked up is a
//! *view*: the inodes of its tree are `view << 32 | inode in the layer's tree`. Two images
//! sharing a layer share one opened layer through two views, so a directory never has two
//! parents (the kernel allows a directory one dentry); and as a layer's tree numbers its
//! nodes the same way each time it is built, a view outlives the layer it shows: a layer
//! released while idle is opened again, with the same numbers, when the kernel next asks.

use std::collections::HashMap;

/// The store's root directory.
pub const ROOT: u64 = 1;

/// The bits of a view's inode numbers that number the node in the layer's tree.
const VIEW_SHIFT: u32 = 32;

/// A node of the store's own (not of a layer's tree).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Place {
    Root,
    /// The directory of an image reference, by image id.
    Image(u32),
    /// An image's layer directory: image id, layer digest.
    Layer(u32, String),
    /// The layer's metadata (containers/storage's `Layer` as JSON).
    Info(u32, String),
    /// The layer's compressed blob.
    Blob(u32, String),
}

/// What an inode number stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Place(Place),
    /// Node `local` of the tree of view `view`.
    Diff {
        view: u32,
        local: u64,
    },
}

/// The inode numbers handed out so far.
pub struct Nodes {
    places: Vec<Place>,
    by_place: HashMap<Place, u64>,
    /// View `i + 1`: (image id, layer digest).
    views: Vec<(u32, String)>,
    by_view: HashMap<(u32, String), u32>,
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes {
            places: vec![Place::Root],
            by_place: HashMap::from([(Place::Root, ROOT)]),
            views: Vec::new(),
            by_view: HashMap::new(),
        }
    }
}

impl Nodes {
    /// The inode number of `place`, handed out now if it has none (`None` once the store's
    /// own numbers are used up).
    pub fn ino(&mut self, place: Place) -> Option<u64> {
        if let Some(&ino) = self.by_place.get(&place) {
            return Some(ino);
        }
        let ino = self.places.len() as u64 + 1;
        if ino >> VIEW_SHIFT != 0 {
            return None;
        }
        self.places.push(place.clone());
        self.by_place.insert(place, ino);
        Some(ino)
    }

    /// The view of layer `digest` of image `image`, made now if it has none (`None` once
    /// views are used up).
    pub fn view(&mut self, image: u32, digest: &str) -> Option<u32> {
        let key = (image, digest.to_string());
        if let Some(&v) = self.by_view.get(&key) {
            return Some(v);
        }
        let v = u32::try_from(self.views.len() + 1).ok()?;
        self.views.push(key.clone());
        self.by_view.insert(key, v);
        Some(v)
    }

    /// The image and layer a view shows.
    pub fn view_target(&self, view: u32) -> Option<(u32, &str)> {
        let (image, digest) = self.views.get((view as usize).checked_sub(1)?)?;
        Some((*image, digest))
    }

    /// The inode number of node `local` of view `view`'s tree (`None` past 2^32 nodes).
    pub fn diff_ino(view: u32, local: u64) -> Option<u64> {
        (local >> VIEW_SHIFT == 0).then_some(((view as u64) << VIEW_SHIFT) | local)
    }

    /// What inode `ino` stands for, if it was handed out.
    pub fn node(&self, ino: u64) -> Option<Node> {
        let view = (ino >> VIEW_SHIFT) as u32;
        if view == 0 {
            let place = self.places.get((ino as usize).checked_sub(1)?)?;
            return Some(Node::Place(place.clone()));
        }
        self.view_target(view)?;
        Some(Node::Diff {
            view,
            local: ino & ((1 << VIEW_SHIFT) - 1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_and_views_keep_their_numbers() {
        let mut n = Nodes::default();
        assert_eq!(n.node(ROOT), Some(Node::Place(Place::Root)));
        let img = n.ino(Place::Image(1)).unwrap();
        let layer = n.ino(Place::Layer(1, "sha256:a".into())).unwrap();
        assert_ne!(img, layer);
        assert_eq!(
            n.ino(Place::Image(1)),
            Some(img),
            "asked again, same number"
        );
        assert_eq!(
            n.node(layer),
            Some(Node::Place(Place::Layer(1, "sha256:a".into())))
        );
        assert_eq!(n.node(999), None, "never handed out");

        let v1 = n.view(1, "sha256:a").unwrap();
        let v2 = n.view(2, "sha256:a").unwrap();
        assert_ne!(v1, v2, "one view per image, even for a shared layer");
        assert_eq!(n.view(1, "sha256:a"), Some(v1));
        let ino = Nodes::diff_ino(v2, 5).unwrap();
        assert!(ino > u32::MAX as u64);
        assert_eq!(n.node(ino), Some(Node::Diff { view: v2, local: 5 }));
        assert_eq!(n.view_target(v2), Some((2, "sha256:a")));
        assert_eq!(
            n.node(Nodes::diff_ino(77, 1).unwrap()),
            None,
            "no such view"
        );
        assert_eq!(Nodes::diff_ino(1, 1 << 32), None);
    }
}
