//! Room registry: who is in which room, bounded in every direction.
//!
//! Pure logic, no I/O: a member is stored with an opaque handle `H` (the
//! server uses a channel sender), ids come in from the caller, and every
//! decision (room full, unknown peer, ...) is returned as a value. The
//! server keeps one registry behind a mutex and never awaits while holding it.

use std::collections::HashMap;

/// Longest room name accepted (characters, all ASCII).
pub const MAX_ROOM_NAME: usize = 64;
/// Longest display name kept (characters); longer names are truncated.
pub const MAX_DISPLAY_NAME: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Members per room.
    pub room_size: usize,
    /// Rooms with at least one member.
    pub max_rooms: usize,
    /// Members over all rooms.
    pub max_members: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
    RoomFull,
    TooManyRooms,
    ServerFull,
    /// The caller's fresh id is already taken; draw another.
    DuplicateId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// The sender is not (or no longer) in the room.
    NotMember,
    /// The addressee is not in the sender's room.
    UnknownPeer,
    /// Addressed to the sender itself.
    ToSelf,
}

#[derive(Debug, Clone)]
pub struct Member<H> {
    pub id: String,
    pub name: String,
    pub handle: H,
}

#[derive(Debug)]
pub struct Registry<H> {
    limits: Limits,
    /// Members in join order; a room is removed when its last member leaves.
    rooms: HashMap<String, Vec<Member<H>>>,
    members: usize,
}

impl<H: Clone> Registry<H> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            rooms: HashMap::new(),
            members: 0,
        }
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn member_count(&self) -> usize {
        self.members
    }

    /// Adds a member. Returns the members already there, in join order: the
    /// newcomer is told about them, and they about the newcomer.
    pub fn join(
        &mut self,
        room: &str,
        id: String,
        name: String,
        handle: H,
    ) -> Result<Vec<Member<H>>, JoinError> {
        if self.members >= self.limits.max_members {
            return Err(JoinError::ServerFull);
        }
        let existing = match self.rooms.get(room) {
            Some(members) => {
                if members.len() >= self.limits.room_size {
                    return Err(JoinError::RoomFull);
                }
                if members.iter().any(|m| m.id == id) {
                    return Err(JoinError::DuplicateId);
                }
                members.clone()
            }
            None => {
                if self.rooms.len() >= self.limits.max_rooms {
                    return Err(JoinError::TooManyRooms);
                }
                Vec::new()
            }
        };
        self.rooms
            .entry(room.to_owned())
            .or_default()
            .push(Member { id, name, handle });
        self.members += 1;
        Ok(existing)
    }

    /// Removes a member; returns the members left in the room (to tell them),
    /// or `None` when `id` was not in `room`. An emptied room disappears.
    pub fn leave(&mut self, room: &str, id: &str) -> Option<Vec<Member<H>>> {
        let members = self.rooms.get_mut(room)?;
        let index = members.iter().position(|m| m.id == id)?;
        members.remove(index);
        self.members -= 1;
        let rest = members.clone();
        if rest.is_empty() {
            self.rooms.remove(room);
        }
        Some(rest)
    }

    /// The handle of `to`, if `from` and `to` are two members of `room`.
    pub fn route(&self, room: &str, from: &str, to: &str) -> Result<&H, RouteError> {
        let members = self.rooms.get(room).ok_or(RouteError::NotMember)?;
        if !members.iter().any(|m| m.id == from) {
            return Err(RouteError::NotMember);
        }
        if from == to {
            return Err(RouteError::ToSelf);
        }
        members
            .iter()
            .find(|m| m.id == to)
            .map(|m| &m.handle)
            .ok_or(RouteError::UnknownPeer)
    }
}

/// Room names: 1 to 64 of `A-Z a-z 0-9 _ -`. Safe in a URL path, a log line
/// and HTML without escaping.
pub fn valid_room_name(name: &str) -> bool {
    (1..=MAX_ROOM_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Display names are free text shown to the other members (the page inserts
/// them as text, never as HTML): control characters are dropped, the rest is
/// trimmed and cut at 32 characters; nothing left gives "guest".
pub fn clean_display_name(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .chars()
        .take(MAX_DISPLAY_NAME)
        .collect();
    let cleaned = cleaned.trim_end().to_owned();
    if cleaned.is_empty() {
        "guest".to_owned()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(room_size: usize, max_rooms: usize, max_members: usize) -> Registry<u32> {
        Registry::new(Limits {
            room_size,
            max_rooms,
            max_members,
        })
    }

    fn ids(members: &[Member<u32>]) -> Vec<&str> {
        members.iter().map(|m| m.id.as_str()).collect()
    }

    #[test]
    fn join_reports_existing_members_in_order() {
        let mut r = reg(4, 10, 100);
        assert!(r.join("a", "1".into(), "one".into(), 1).unwrap().is_empty());
        let seen = r.join("a", "2".into(), "two".into(), 2).unwrap();
        assert_eq!(ids(&seen), ["1"]);
        let seen = r.join("a", "3".into(), "three".into(), 3).unwrap();
        assert_eq!(ids(&seen), ["1", "2"]);
        assert_eq!(seen[1].name, "two");
        assert_eq!(r.member_count(), 3);
        assert_eq!(r.room_count(), 1);
    }

    #[test]
    fn room_full_and_duplicate_ids() {
        let mut r = reg(2, 10, 100);
        r.join("a", "1".into(), "x".into(), 1).unwrap();
        assert_eq!(
            r.join("a", "1".into(), "x".into(), 9).unwrap_err(),
            JoinError::DuplicateId
        );
        r.join("a", "2".into(), "x".into(), 2).unwrap();
        assert_eq!(
            r.join("a", "3".into(), "x".into(), 3).unwrap_err(),
            JoinError::RoomFull
        );
        // Other rooms are unaffected, and a leave frees the seat.
        r.join("b", "3".into(), "x".into(), 3).unwrap();
        r.leave("a", "1").unwrap();
        r.join("a", "4".into(), "x".into(), 4).unwrap();
    }

    #[test]
    fn room_and_member_limits() {
        let mut r = reg(4, 2, 3);
        r.join("a", "1".into(), "x".into(), 1).unwrap();
        r.join("b", "2".into(), "x".into(), 2).unwrap();
        assert_eq!(
            r.join("c", "3".into(), "x".into(), 3).unwrap_err(),
            JoinError::TooManyRooms
        );
        r.join("a", "3".into(), "x".into(), 3).unwrap();
        assert_eq!(
            r.join("a", "4".into(), "x".into(), 4).unwrap_err(),
            JoinError::ServerFull
        );
        // The last member leaving removes the room, freeing a room slot.
        assert!(r.leave("b", "2").unwrap().is_empty());
        assert_eq!(r.room_count(), 1);
        r.join("c", "5".into(), "x".into(), 5).unwrap();
    }

    #[test]
    fn leave_returns_the_rest() {
        let mut r = reg(4, 10, 100);
        r.join("a", "1".into(), "x".into(), 1).unwrap();
        r.join("a", "2".into(), "x".into(), 2).unwrap();
        r.join("a", "3".into(), "x".into(), 3).unwrap();
        assert_eq!(ids(&r.leave("a", "2").unwrap()), ["1", "3"]);
        assert!(r.leave("a", "2").is_none(), "second leave is a no-op");
        assert!(r.leave("nope", "1").is_none());
        assert_eq!(r.member_count(), 2);
    }

    #[test]
    fn routes_only_within_a_room() {
        let mut r = reg(4, 10, 100);
        r.join("a", "1".into(), "x".into(), 1).unwrap();
        r.join("a", "2".into(), "x".into(), 2).unwrap();
        r.join("b", "3".into(), "x".into(), 3).unwrap();
        assert_eq!(r.route("a", "1", "2"), Ok(&2));
        assert_eq!(r.route("a", "2", "1"), Ok(&1));
        assert_eq!(r.route("a", "1", "3"), Err(RouteError::UnknownPeer));
        assert_eq!(r.route("b", "3", "1"), Err(RouteError::UnknownPeer));
        assert_eq!(r.route("a", "1", "1"), Err(RouteError::ToSelf));
        assert_eq!(r.route("a", "3", "1"), Err(RouteError::NotMember));
        assert_eq!(r.route("zzz", "1", "2"), Err(RouteError::NotMember));
        r.leave("a", "2").unwrap();
        assert_eq!(r.route("a", "1", "2"), Err(RouteError::UnknownPeer));
    }

    #[test]
    fn room_names() {
        assert!(valid_room_name("a"));
        assert!(valid_room_name("Team_room-42"));
        assert!(valid_room_name(&"x".repeat(64)));
        assert!(!valid_room_name(""));
        assert!(!valid_room_name(&"x".repeat(65)));
        for bad in ["a b", "a/b", "..", "a.b", "é", "<script>", "a%20"] {
            assert!(!valid_room_name(bad), "{bad}");
        }
    }

    #[test]
    fn display_names() {
        assert_eq!(clean_display_name("  Ada  "), "Ada");
        assert_eq!(clean_display_name("A\u{0}d\na"), "Ada");
        assert_eq!(clean_display_name(""), "guest");
        assert_eq!(clean_display_name(" \t "), "guest");
        assert_eq!(clean_display_name("Zoë ✓"), "Zoë ✓");
        assert_eq!(clean_display_name(&"é".repeat(40)).chars().count(), 32);
    }
}
