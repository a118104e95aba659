//! Newtypes for the ids that cross module boundaries, so a user id is never passed
//! where a conversation id is meant.

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub $t);
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A registered user; never reused.
    UserId(u64)
);
id_type!(
    /// A conversation (1:1 now; groups later); never reused.
    ConvId(u64)
);
id_type!(
    /// A shard thread, 0..shards.
    ShardId(usize)
);
id_type!(
    /// A connection, unique within the process for its lifetime.
    ConnId(u64)
);
