//! The media types of chunked Oblivious HTTP (draft-ietf-ohai-chunked-ohttp §4), in one place
//! for the channel and for the relay, which routes on them without the channel's cryptography.

/// Media type of a chunked OHTTP request.
pub const REQUEST_MEDIA_TYPE: &str = "message/ohttp-chunked-req";
/// Media type of a chunked OHTTP response.
pub const RESPONSE_MEDIA_TYPE: &str = "message/ohttp-chunked-res";
