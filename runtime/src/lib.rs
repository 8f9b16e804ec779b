//! Runtime: model forward with a prefix stack.
