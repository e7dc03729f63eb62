//! Security: placeholder, filled by its issue-15 work.
