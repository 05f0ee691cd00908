//! The only module allowed `unsafe`: mlock, core dumps off. (to be written)
