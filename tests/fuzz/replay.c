/* SPDX-License-Identifier: MIT */
/*
 * fuzz_replay - runs fuzz_api.c's LLVMFuzzerTestOneInput() on files, without
 * libFuzzer: every argument is an input file, or a directory whose files
 * (in name order) are inputs. ctest runs it on tests/fuzz/corpus/ and
 * tests/fuzz/regressions/, so the plain build replays every input that
 * once crashed. A divergence from the model abort()s, as under libFuzzer.
 * Exit 0 all passed, 1 an input could not be read, 77 no userfaultfd.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int replay_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	uint8_t *buf = NULL;
	size_t n = 0, cap = 0;

	if (!f) {
		fprintf(stderr, "fuzz_replay: %s: %s\n", path, strerror(errno));
		return 1;
	}
	for (;;) {
		if (n == cap) {
			uint8_t *b = realloc(buf, cap = cap ? 2 * cap : 4096);

			if (!b) {
				fclose(f);
				free(buf);
				return 1;
			}
			buf = b;
		}
		size_t got = fread(buf + n, 1, cap - n, f);

		if (!got)
			break;
		n += got;
	}
	fclose(f);
	fprintf(stderr, "  %s (%zu bytes)\n", path, n);
	LLVMFuzzerTestOneInput(buf, n);
	free(buf);
	return 0;
}

static int by_name(const struct dirent **a, const struct dirent **b)
{
	return strcmp((*a)->d_name, (*b)->d_name);
}

static int replay(const char *path)
{
	struct dirent **ent;
	struct stat st;
	int n, ret = 0;

	if (stat(path, &st) < 0) {
		fprintf(stderr, "fuzz_replay: %s: %s\n", path, strerror(errno));
		return 1;
	}
	if (!S_ISDIR(st.st_mode))
		return replay_file(path);
	n = scandir(path, &ent, NULL, by_name);
	if (n < 0) {
		fprintf(stderr, "fuzz_replay: %s: %s\n", path, strerror(errno));
		return 1;
	}
	for (int i = 0; i < n; i++) {
		char *file;

		/* Dot files (a README, editor droppings) are not inputs. */
		if (ent[i]->d_name[0] != '.' && asprintf(&file, "%s/%s", path, ent[i]->d_name) >= 0) {
			if (stat(file, &st) == 0 && S_ISREG(st.st_mode))
				ret |= replay_file(file);
			free(file);
		}
		free(ent[i]);
	}
	free(ent);
	return ret;
}

int main(int argc, char **argv)
{
	int ret = 0;

	for (int i = 1; i < argc; i++)
		ret |= replay(argv[i]);
	return ret;
}
