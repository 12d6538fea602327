# The `_ed25519` C module for CMake-based ports (esp32, rp2), the upstream user-C-module
# pattern. Not built here: this repository builds only make-based ports (docs/ed25519.md).
add_library(usermod_ed25519c INTERFACE)
target_sources(usermod_ed25519c INTERFACE ${CMAKE_CURRENT_LIST_DIR}/mod_ed25519.c)
target_include_directories(usermod_ed25519c INTERFACE ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(usermod INTERFACE usermod_ed25519c)
