# The `_ed25519` C module (mod_ed25519.c), compiled into every firmware microfed builds:
# boards/firmware/manifest.py names this directory with c_module(). Make-based ports
# (unix, qemu, stm32, nrf) read this file; CMake-based ones (esp32, rp2) micropython.cmake.
ED25519C_DIR := $(USERMOD_DIR)
SRC_USERMOD_C += $(ED25519C_DIR)/mod_ed25519.c
